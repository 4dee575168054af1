"""PII scrubber quality on the labelled pt_BR set (tests/fixtures/pii_ptbr.py, faker-generated,
independent of the detector's patterns).

For each kind: recall (a planted span lies wholly inside a hit of its kind) and precision (a
hit overlaps a planted span of its kind), each with a 95% Wilson interval; then the share of
look-alike negatives with any hit. The main seed is the one the detector was developed
against; the held-out seed was looked at only to report it. Targets: recall >= 0.99 for
e-mail, IP and CPF, >= 0.95 for phones, false positives <= 1%.

    .venv/bin/python benchmarks/pii.py [--per-type 250] [--negatives 600] [--seed 2024] [--held-out 2025]

The last line is JSON (the main seed's figures, and the held-out seed's under "held_out").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.text.pii import find  # noqa: E402
from tests.fixtures.pii_ptbr import KINDS, labelled_set  # noqa: E402

TARGETS = {"EMAIL": 0.99, "IP": 0.99, "CPF": 0.99, "PHONE": 0.95}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(seed: int, per_type: int, n_negatives: int) -> dict:
    positives, negatives = labelled_set(seed=seed, per_type=per_type, n_negatives=n_negatives)
    found, total, hit_ok, hit_all = Counter(), Counter(), Counter(), Counter()
    misses: Counter = Counter()
    for item in positives + negatives:
        hits = find(item.text)
        for start, end, kind in item.spans:
            total[kind] += 1
            ok = any(h.kind == kind and h.start <= start and end <= h.end for h in hits)
            found[kind] += ok
            if not ok:
                misses[(kind, item.form)] += 1
        for h in hits:
            hit_all[h.kind] += 1
            hit_ok[h.kind] += any(k == h.kind and s < h.end and h.start < e for s, e, k in item.spans)
    fp = Counter(item.form for item in negatives if find(item.text))
    return {"found": found, "total": total, "hit_ok": hit_ok, "hit_all": hit_all, "misses": misses,
            "false_positives": fp, "n_negatives": len(negatives)}


def report(name: str, r: dict) -> dict:
    print(f"\n{name}")
    print(f"  {'kind':6} {'n':>5} {'recall':>7} {'95% CI':>15} {'precision':>10} {'95% CI':>15}  target")
    out = {}
    for kind in KINDS:
        k, n, hk, hn = r["found"][kind], r["total"][kind], r["hit_ok"][kind], r["hit_all"][kind]
        rl, rh = wilson(k, n)
        pl, ph = wilson(hk, hn)
        recall, precision = k / n, hk / hn if hn else 0.0
        mark = "ok" if recall >= TARGETS[kind] else "MISSED"
        print(f"  {kind:6} {n:5d} {recall:7.3f} [{rl:.3f}, {rh:.3f}] {precision:10.3f} [{pl:.3f}, {ph:.3f}]"
              f"  >= {TARGETS[kind]} {mark}")
        out[f"recall_{kind.lower()}"] = round(recall, 4)
        out[f"precision_{kind.lower()}"] = round(precision, 4)
    n_fp, n_neg = sum(r["false_positives"].values()), r["n_negatives"]
    fl, fh = wilson(n_fp, n_neg)
    print(f"  false positives on {n_neg} look-alike negatives: {n_fp} ({n_fp / n_neg:.3%}, 95% CI "
          f"[{fl:.3%}, {fh:.3%}]) target <= 1% {'ok' if n_fp / n_neg <= 0.01 else 'MISSED'}")
    if r["misses"]:
        print("  misses by form: " + ", ".join(f"{k}/{f} {c}" for (k, f), c in r["misses"].most_common(8)))
    if r["false_positives"]:
        print("  false positives by form: " + ", ".join(f"{f} {c}" for f, c in r["false_positives"].most_common(8)))
    out["false_positive_rate"] = round(n_fp / n_neg, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-type", type=int, default=250)
    ap.add_argument("--negatives", type=int, default=600)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--held-out", type=int, default=2025)
    args = ap.parse_args()
    main_ = report(f"seed {args.seed} (development)", evaluate(args.seed, args.per_type, args.negatives))
    held = report(f"seed {args.held_out} (held out)", evaluate(args.held_out, args.per_type, args.negatives))
    print(json.dumps({**main_, "seed": args.seed, "per_type": args.per_type, "negatives": args.negatives,
                      "held_out": {**held, "seed": args.held_out}}))


if __name__ == "__main__":
    main()
