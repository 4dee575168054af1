"""benchmarks/gpu.sh, the script for the day a GPU is lent: it must run unattended and print one
JSON line per benchmark on stdout, a failed or unstarted one included, so it is checked here on
the CPU (its --cpu plan; the generation benchmark, the quickest) rather than discovered broken
on that day. The whole --cpu plan (train in bf16, generate, serve) takes about 40 s here."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args, "--logs", str(tmp_path / "logs")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


def test_the_cpu_plan_prints_one_json_line_per_benchmark_with_its_result(tmp_path):
    done = run("--cpu", "--only", "generate", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in done.stdout.splitlines()]  # stdout holds nothing but the JSON lines
    assert [r["benchmark"] for r in lines] == ["generate"]
    result = lines[0]["result"]
    assert lines[0]["ok"] and result["device"].startswith("cpu") and result["identical_tokens"] is True
    assert result["cached_tokens_per_s"] > 0
    assert (tmp_path / "logs" / "generate.log").read_text().strip().endswith("}")


def test_a_spent_budget_is_a_failed_line_per_benchmark_not_a_hang(tmp_path):
    done = run("--cpu", "--budget", "5", tmp_path=tmp_path)
    assert done.returncode == 1
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["benchmark"] for r in lines] == ["train", "generate", "serve"]
    assert all(not r["ok"] and "budget" in r["error"] for r in lines)


def test_without_cuda_the_gpu_plan_says_how_to_check_on_the_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU plan would run")
    done = run(tmp_path=tmp_path)
    assert done.returncode == 2 and "--cpu" in done.stderr and done.stdout == ""
