"""What a stage cost: measured on real processes (a worker alive before the stage, a child that
ends inside it, memory a child holds), kept in the manifest, and added up per model."""
import subprocess
import sys
import time

from tasks import cost, stage
from tasks.config import DedupeConfig

BURN = "import time\nt=time.process_time()\nwhile time.process_time()-t<{s}: pass\n"


def test_the_meter_counts_workers_and_children_by_what_they_spent_inside_the_block():
    # A worker that burned 1 s of CPU before the block, then burns 0.6 s inside it (like a pool worker
    # shared by two stages): only the 0.6 s belong to the block.
    worker = subprocess.Popen([sys.executable, "-c", BURN.format(s=1.0) + "import sys; sys.stdin.readline()\n"
                               + BURN.format(s=0.6) + "sys.stdin.readline()\n"], stdin=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        while True:  # wait for its first burn to end
            import psutil

            if psutil.Process(worker.pid).cpu_times().user + psutil.Process(worker.pid).cpu_times().system >= 1.0:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        with cost.Meter(interval_s=0.05) as m:
            worker.stdin.write("go\n")
            worker.stdin.flush()
            # a child started and ended (reaped) inside the block, holding ~150 MB for a moment
            subprocess.run([sys.executable, "-c", "b = bytearray(150 * 2**20)\n" + BURN.format(s=0.5)], check=True)
            time.sleep(0.8)  # the worker's second burn has ended; it waits for its next line
        r = m.result()
    finally:
        worker.stdin.write("end\n")
        worker.stdin.flush()
        worker.wait(10)
    # 0.5 s (child) + 0.6 s (worker) + the child's interpreter start; never the worker's first second
    assert 1.1 <= r["cpu_s"] < 1.9, r
    assert r["wall_s"] >= r["cpu_s"] / 2 and r["peak_rss_mb"] >= 150, r


def test_a_stage_keeps_its_cost_and_a_cache_hit_reports_what_it_cost_when_made(tmp_path):
    def build(out, key):
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
        (out / "x.txt").write_text("x")
        return {"rows": 1, "cost": {"tokens": 1234}}  # a stage's own figures join the measured ones

    m = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, build, [stage])
    assert m.cost["cpu_s"] >= 0.3 and m.cost["wall_s"] >= 0.3 and m.cost["tokens"] == 1234
    assert "cost" not in m.stats  # counts stay counts
    again = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, lambda out, key: {}, [stage])
    assert again.cost == m.cost


def test_a_models_cost_adds_up_its_stages_and_marks_the_reused_ones():
    rows = [cost.stage_row("crawl", {"wall_s": 10.0, "cpu_s": 4.0, "peak_rss_mb": 300.0}, reused=True),
            cost.stage_row("pretrain", {"wall_s": 60.0, "cpu_s": 110.0, "peak_rss_mb": 900.0, "tokens": 5000,
                                        "tokens_per_s": 83.3, "mfu": 0.012}, reused=False),
            cost.stage_row("evaluate", {}, reused=False)]  # made before forja measured
    tags = cost.version_tags(rows)
    assert tags["forja.cost.wall_s"] == "70.0" and tags["forja.cost.cpu_s"] == "114.0"
    assert tags["forja.cost.peak_rss_mb"] == "900.0" and tags["forja.cost.rebuilt_cpu_s"] == "110.0"
    assert tags["forja.cost.train_tokens"] == "5000" and tags["forja.cost.train_mfu"] == "0.012"
    assert tags["forja.cost.stage.crawl"].endswith("(reused)") and "reused" not in tags["forja.cost.stage.pretrain"]
    assert tags["forja.cost.stage.evaluate"] == "not measured"
    md = cost.markdown(rows, "What m/1 cost")
    assert all(f"| {s} |" in md for s in ("crawl", "pretrain", "evaluate")) and "| 1.20% |" in md
