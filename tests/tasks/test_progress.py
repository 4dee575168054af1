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


def test_an_interrupted_training_leaves_no_process_behind(tmp_path):
    """A task timeout (or a cancelled run) stops the launcher and every rank it started."""
    import os
    import sys

    import pytest
    from prefect.utilities.timeout import timeout

    from tasks.pretrain import run_training

    pids = tmp_path / "pids"
    # A "launcher" that starts a "rank" which ignores nothing and sleeps, then prints steps.
    script = (f"import os, subprocess, sys, time\n"
              f"rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{rank.pid}}')\n"
              f"print('step 1 train_loss=1.0', flush=True)\n"
              f"time.sleep(600)\n")
    with pytest.raises(TimeoutError):
        with timeout(seconds=3):
            run_training([sys.executable, "-c", script], dict(os.environ), 10)
    for pid in map(int, pids.read_text().split()):
        try:
            os.kill(pid, 0)
            alive = not open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except ProcessLookupError:
            alive = False
        assert not alive, f"process {pid} still running after the training was interrupted"


def test_a_finished_run_leaves_no_deepspeed_buffer_of_its_port_in_shared_memory(tmp_path):
    from model.train import drop_shm_buffers
    from tasks.pretrain import master_port

    names = ["deepspeed_allreduce_buffer_0_127.0.0.1_33037_0", "deepspeed_allreduce_buffer_1_127.0.0.1_33037_0",
             "deepspeed_allreduce_buffer_0_127.0.0.1_33037",  # this run's (two ranks, either naming)
             "deepspeed_allreduce_buffer_0_127.0.0.1_3303_0",  # other runs' (a port that is a prefix of it)
             "deepspeed_allreduce_buffer_0_127.0.0.1_43037_0", "PostgreSQL.1234"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", "33037", "--module", "model.train"]
    assert master_port(cmd) == 33037
    gone = drop_shm_buffers(master_port(cmd), tmp_path)
    assert sorted(p.name for p in gone) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
