import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def forja(*args, **kw):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_help_explains_itself():
    r = forja("--help")
    assert r.returncode == 0 and "run" in r.stdout
    r = forja("run", "--help")
    assert r.returncode == 0 and "--set" in r.stdout and "--workdir" in r.stdout and "FORJA_WORKDIR" in r.stdout


def test_misspelt_key_fails_before_anything_runs(tmp_path):
    r = forja("run", "configs/demo.yaml", "--set", "dedupe.treshold=0.9", "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2
    assert "dedupe.treshold" in r.stderr and "configs/demo.yaml" in r.stderr
    assert not (tmp_path / "w" / "artifacts").exists()


def test_prefect_yaml_declares_the_service_deployments():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    flows = {"demo-weekly": "forja-pipeline", "demo-finetune": "forja-finetune", "batch": "forja-batch",
             "promote": "forja-promote", "rollback": "forja-rollback", "feedback-weekly": "forja-feedback",
             "sweep": "forja-sweep", "ladder": "forja-ladder"}
    assert set(deployments) == set(flows)
    for name, dep in deployments.items():
        assert dep["entrypoint"].startswith("flows/")
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        assert flow.name == flows[name]
        props = flow.parameters.properties
        assert set(dep["parameters"]) <= set(props)
        # The UI form is usable by a person: every parameter described.
        assert all(p.get("description") for p in props.values()), (name, props)
        assert dep["work_pool"]["name"] == "forja-process"
        # A worker's run sends forja's own logs to the run's log.
        assert dep["work_pool"]["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "forja"
    weekly = deployments["demo-weekly"]
    assert (ROOT / weekly["parameters"]["config_path"]).is_file()
    assert (ROOT / deployments["batch"]["parameters"]["input_path"]).is_file()
    for name in ("demo-weekly", "feedback-weekly"):
        (schedule,) = deployments[name]["schedules"]
        minute, hour, dom, month, dow = schedule["cron"].split()
        assert dom == "*" and month == "*" and dow not in ("*",)  # once a week
    # One run per deployment at a time: a second one waits its turn.
    for name in ("demo-weekly", "demo-finetune", "feedback-weekly"):
        assert deployments[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # The fine-tune follows the retrain's completion, not the clock.
    ft = deployments["demo-finetune"]
    assert "schedules" not in ft
    (trigger,) = ft["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["match_related"]["prefect.resource.name"] == "demo-weekly"
    assert "flow_run.parameters.config_path" in trigger["parameters"]["config_path"]
