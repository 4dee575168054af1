"""The terminal progress bar the pretrain and finetune tasks feed from the training's lines."""
import sys

from tasks.pretrain import TrainingProgress


def test_progress_bar_follows_step_lines_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with TrainingProgress(300, "finetune") as bar:
        assert bar.progress is not None
        bar.update("step     25 train_loss=6.801 lr=0.0025 grad_norm=0.89 tokens_per_s=4327")
        task = bar.progress.tasks[0]
        assert task.completed == 25 and task.total == 300
        assert "6.801" in task.fields["info"] and "4327" in task.fields["info"]
        bar.update("model: 4.26M parameters")  # not a step line
        assert bar.progress.tasks[0].completed == 25


def test_no_bar_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with TrainingProgress(10) as bar:
        bar.update("step 5 train_loss=1.0")
        assert bar.progress is None
