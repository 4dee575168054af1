"""What a stage, and so a model, cost to make: wall time, CPU-seconds, peak memory (and, from
the stages that know them, GPU-seconds, tokens, tokens per second and MFU).

run_stage measures every build with a Meter and keeps the figures in the stage's manifest
(`cost`), so a stage reused from the cache still says what it cost when it was made. The
register stage adds them up for the version it registers (version tags `forja.cost.*`, a table
in the training run and in the Prefect run), marking each stage this run reused.

The Meter counts this machine's process tree: the stage's own process, the pool or Dask workers
it started or shares, the training launcher and its ranks. Work on other machines (a remote Dask
scheduler's workers, a hostfile's nodes) is not in it.
"""
from __future__ import annotations

import threading
import time

import psutil

MB = 2**20
# The measured fields, in table order, with the way each one adds up over stages.
FIELDS = {"wall_s": sum, "cpu_s": sum, "gpu_s": sum, "peak_rss_mb": max}


def _cpu(times) -> float:
    """CPU-seconds of a process, its reaped children included (their time is only ever in there)."""
    return times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)


class Meter:
    """Measure a block: `with Meter() as m: ...; m.result()`.

    A thread samples the process tree every `interval_s`: the resident memory of all of it (the
    peak is a sampled one: a spike shorter than the interval can be missed) and the CPU time of
    each process. CPU-seconds are what the tree spent during the block: for each process alive at
    the end, its time then minus its time at the start (0 if it started later); for one that ended
    on the way, its last sample minus its start; exited direct children are counted through this
    process's children_* times when reaped, so none is counted twice.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.me = psutil.Process()
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._children: set[int] = set()
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _tree(self) -> list[psutil.Process]:
        try:
            return self.me.children(recursive=True)
        except psutil.Error:
            return []

    def _sample(self, first: bool = False) -> None:
        rss = self.me.memory_info().rss
        seen: dict[int, float] = {}
        for p in self._tree():
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    seen[p.pid] = _cpu(p.cpu_times())
                    if p.ppid() == self.me.pid:
                        self._children.add(p.pid)
            except psutil.Error:  # ended between the listing and the read
                continue
        with self._lock:
            self._peak = max(self._peak, rss)
            for pid, cpu in seen.items():
                if first:
                    self._start[pid] = cpu
                self._last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "Meter":
        self._t0, self._own0 = time.monotonic(), _cpu(self.me.cpu_times())
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="forja-cost-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.monotonic() - self._t0
        own = _cpu(self.me.cpu_times()) - self._own0  # this process, and the children it reaped meanwhile
        alive = {p.pid for p in self._tree()}
        tree = 0.0
        for pid, last in self._last.items():
            if pid in self._children and pid not in alive:
                continue  # reaped by this process: already in `own`, whole
            tree += max(0.0, last - self._start.get(pid, 0.0))
        self.cpu_s = own + tree

    def result(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "peak_rss_mb": round(self._peak / MB, 1)}


# -- a model's cost: the stages that made it ------------------------------------------------------

def stage_row(stage: str, cost: dict, reused: bool) -> dict:
    """One stage's line of the cost table (missing figures as None: made before forja measured)."""
    row = {"stage": stage, **{k: cost.get(k) for k in FIELDS}, "reused": reused}
    for k in ("tokens", "tokens_per_s", "mfu"):
        if cost.get(k) is not None:
            row[k] = cost[k]
    return row


def total(rows: list[dict], reused: bool | None = None) -> dict:
    """The figures of rows added up (peak memory: the largest); reused=False: only what this run spent."""
    picked = [r for r in rows if reused is None or r["reused"] == reused]
    out = {}
    for k, how in FIELDS.items():
        values = [r[k] for r in picked if r.get(k) is not None]
        out[k] = round(how(values), 3) if values else 0.0
    return out


def version_tags(rows: list[dict]) -> dict[str, str]:
    """Tags for a registered version: the totals, training's throughput, and each stage in one line."""
    tags = {f"forja.cost.{k}": str(v) for k, v in total(rows).items()}
    tags["forja.cost.rebuilt_cpu_s"] = str(total(rows, reused=False)["cpu_s"])
    train = next((r for r in rows if r["stage"] in ("pretrain", "finetune")), None)
    for k in ("tokens", "tokens_per_s", "mfu"):
        if train is not None and train.get(k) is not None:
            tags[f"forja.cost.train_{k}"] = str(train[k])
    for r in rows:
        tags[f"forja.cost.stage.{r['stage']}"] = describe(r)
    return tags


def describe(row: dict) -> str:
    """A stage's cost in a few words: 'wall 12.3 s, CPU 20.1 s, peak 812 MB (reused)'."""
    if row.get("wall_s") is None:
        return "not measured" + (" (reused)" if row["reused"] else "")
    parts = [f"wall {row['wall_s']:.1f} s", f"CPU {row['cpu_s']:.1f} s"]
    if row.get("gpu_s"):
        parts.append(f"GPU {row['gpu_s']:.1f} s")
    parts.append(f"peak {row['peak_rss_mb']:.0f} MB")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:.0f} tokens/s")
    return ", ".join(parts) + (" (reused)" if row["reused"] else "")


def markdown(rows: list[dict], title: str) -> str:
    """The cost table: a line per stage, the total, and what this run itself spent."""
    def num(v, fmt="{:,.1f}"):
        return "" if v is None else fmt.format(v)

    lines = [f"# {title}", "", "| stage | wall s | CPU s | GPU s | peak MB | tokens | tokens/s | MFU | reused |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {num(r.get('wall_s'))} | {num(r.get('cpu_s'))} | {num(r.get('gpu_s'))} | "
                     f"{num(r.get('peak_rss_mb'), '{:,.0f}')} | {num(r.get('tokens'), '{:,}')} | "
                     f"{num(r.get('tokens_per_s'), '{:,.0f}')} | {num(r.get('mfu'), '{:.2%}')} | "
                     f"{'yes' if r['reused'] else ''} |")
    for label, t in (("**total**", total(rows)), ("**this run**", total(rows, reused=False))):
        lines.append(f"| {label} | {t['wall_s']:,.1f} | {t['cpu_s']:,.1f} | {t['gpu_s']:,.1f} | "
                     f"{t['peak_rss_mb']:,.0f} | | | | |")
    lines += ["", "CPU-seconds and peak memory count this machine's process tree (the stage, its workers, the "
              "training ranks); peak memory is sampled every 0.2 s. A reused stage shows what it cost when it "
              "was made; **this run** adds only the stages it rebuilt."]
    return "\n".join(lines) + "\n"
