"""forja sweep and forja ladder on the test site: trials share their data stages, become child runs
of one MLflow parent that names the best, and a sweep killed after its first trial resumes with
that trial as cache hits; the ladder fits the sizes and predicts the next one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.test_pipeline import write_config

ROOT = Path(__file__).resolve().parents[2]
GRID = ["pretrain.lr=3e-3,2e-2", "pretrain.micro_batch_size=4,2000"]  # 2000 rows: more than the data has


def test_trials_are_every_combination_or_seeded_random_draws():
    from flows import sweep

    grid = sweep.parse_grid(["pretrain.lr=1e-3,3e-3", "pretrain.preset=micro,tiny"])
    assert grid == {"pretrain.lr": [0.001, 0.003], "pretrain.preset": ["micro", "tiny"]}
    trials = sweep.expand(grid, {})
    assert len(trials) == 4 and {"pretrain.lr": 0.003, "pretrain.preset": "tiny"} in trials
    ranges = sweep.parse_ranges(["pretrain.lr=1e-4:1e-2:log", "pretrain.warmup_steps=1:5"])
    drawn = sweep.expand(grid, ranges, samples=6, seed=3)
    assert drawn == sweep.expand(grid, ranges, samples=6, seed=3) != sweep.expand(grid, ranges, samples=6, seed=4)
    assert len(drawn) == 6 and all(1e-4 <= t["pretrain.lr"] <= 1e-2 and 1 <= t["pretrain.warmup_steps"] <= 5
                                   and isinstance(t["pretrain.warmup_steps"], int) for t in drawn)
    assert sweep.overrides_of({"pretrain.lr": 0.003, "pretrain.preset": "tiny"}) == ["pretrain.lr=0.003",
                                                                                     "pretrain.preset=tiny"]
    with pytest.raises(sweep.SweepError, match="--range needs --random"):
        sweep.expand({}, ranges)


def test_bad_sweeps_are_refused_before_any_trial_runs(tmp_path, site):
    from flows import sweep

    config = write_config(tmp_path, site)
    with pytest.raises(sweep.SweepError, match=r"unknown key 'pretrain.learning_rate' \(valid keys here: .*\blr\b"):
        sweep.check_trials(str(config), [], [{"pretrain.learning_rate": 1e-3}])
    # the memory check pretrain makes, for every trial before the first: 1b at a long context does not fit
    with pytest.raises(sweep.SweepError, match=r"trial 2 \(preset=1b\) would not fit: .* GiB"):
        sweep.check_trials(str(config), ["pretrain.micro_batch_size=64", "tokenize.seq_len=2048"],
                           [{"pretrain.preset": "micro"}, {"pretrain.preset": "1b"}])
    from tasks.ladder import LadderError, check_presets

    with pytest.raises(LadderError, match="power law has two parameters.*add --presets micro,tiny,small"):
        check_presets(["micro", "tiny"])
    assert not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory):
    """`forja sweep` killed (SIGKILL) right after its first trial, then the same sweep again."""
    from prefect.settings import PREFECT_API_URL

    from flows.sweep import sweep
    from tests.fixtures.site import make_site

    tmp = tmp_path_factory.mktemp("sweep")
    config = write_config(tmp, make_site(tmp / "site"))
    cfg = yaml.safe_load(config.read_text())
    cfg["evaluate"]["suites"] = cfg["evaluate"]["suites"][:1]  # the text suite: enough to rank trials by
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    workdir = tmp / "work"
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), FORJA_FAULT="sweep:trial-done",
               OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(config), "--grid", GRID[0], "--grid",
                             GRID[1], "--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    first_runs = {p.name for p in (workdir / "artifacts" / "pretrain").iterdir() if not p.name.startswith(".")}
    result = sweep(config_path=str(config), grid=GRID, workdir=str(workdir))
    return tmp, config, workdir, killed, first_runs, result


def test_a_killed_sweep_resumes_and_its_trials_are_children_of_one_parent_that_names_the_best(swept):
    import mlflow

    tmp, config, workdir, killed, first_runs, result = swept
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]  # killed after trial 1
    assert len(first_runs) == 1
    artifacts = workdir / "artifacts"
    for stage in ("crawl", "dedupe", "normalize", "tokenize"):  # shared by both trials: built once
        assert len([p for p in (artifacts / stage).iterdir() if not p.name.startswith(".")]) == 1, stage
    trained = {p.name for p in (artifacts / "pretrain").iterdir() if not p.name.startswith(".")}
    assert len(trained) == 2 and first_runs < trained  # the resumed sweep reused trial 1, trained trial 2

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("forja-test")
    parents = client.search_runs([exp.experiment_id], "tags.`forja.sweep.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"]  # the resume found its parent
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    lrs = {float(c.data.params["sweep.pretrain.lr"]): c for c in children}
    assert set(lrs) == {3e-3, 2e-2} and all("eval_val_bits_per_byte" in c.data.metrics for c in children)
    best = min(children, key=lambda c: c.data.metrics["eval_val_bits_per_byte"])
    assert parent.data.tags["forja.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_bits_per_byte"] == pytest.approx(best.data.metrics["eval_val_bits_per_byte"])
    assert {"sweep.md", "sweep.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert result["best"]["mlflow_run_id"] == best.info.run_id
    # the trials whose batch the data cannot fill failed at once, saying why; the others went on
    rows = {(r["pretrain.lr"], r["pretrain.micro_batch_size"]): r for r in result["trials"]}
    assert len(rows) == 4 and all(rows[lr, "4"]["error"] is None for lr in ("0.003", "0.02"))
    assert all("pretraining needs at least 2000" in rows[lr, "2000"]["error"] for lr in ("0.003", "0.02"))


def test_the_ladder_fits_the_sizes_and_predicts_the_next_one(swept):
    """micro at the sweep's first learning rate is the sweep's trial 1 (a cache hit); tiny and small train."""
    import mlflow

    from flows.ladder import ladder

    tmp, config, workdir, *_ = swept
    result = ladder(config_path=str(config), presets=["micro", "tiny", "small"], workdir=str(workdir))
    fit = result["fit"]
    assert [r["name"] for r in fit["rungs"]] == ["micro", "tiny", "small"]
    params = [r["params"] for r in fit["rungs"]]
    flops = [r["flops"] for r in fit["rungs"]]
    assert params == sorted(params) and flops == sorted(flops) and len(set(r["tokens"] for r in fit["rungs"])) == 1
    assert fit["next"]["preset"] == "gpt2-124m" and fit["next"]["bpb_low"] <= fit["next"]["bpb"] <= fit["next"]["bpb_high"]
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["forja.ladder.next_preset"] == "gpt2-124m" and "ladder.alpha" in parent.data.metrics
    assert {"ladder.png", "ladder.md", "ladder.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert json.loads(client.download_artifacts(parent.info.run_id, "ladder.json", str(tmp)) and
                      Path(tmp, "ladder.json").read_text())["alpha"] == pytest.approx(fit["alpha"])
