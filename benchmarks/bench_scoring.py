"""The AUC's bootstrap interval, side by side in one run: the sort-once count bootstrap ÷ roc_auc_score per resample.

Usage:
    python benchmarks/bench_scoring.py [--resamples 1000] [--sizes 4000 22003 220025] [--out benchmarks/results.json]

``hcd.scoring.bootstrap_auc`` (the ``metrics`` stage and ``hcd score``) is hand-written:
no library computes a bootstrap of the AUC. The obvious way — scikit-learn's
``roc_auc_score`` on each resample, which sorts it again — is what hcd did before.
Both draw the same resamples from the same generator; the benchmark times them on
predictions of the sizes a run scores (the tiny demo's validation side, Kaggle's
validation side at ``split.val_fraction: 0.1``, and its 220,025 out-of-fold
predictions with ``split.folds`` ≥ 2), scores rounded to float32 as the predict
stage writes them, and prints the ratio and the largest difference between the two
intervals. The loop is timed on a subset of the resamples when it would take long
(its time per resample is flat); the count bootstrap does all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcd.atomic import write_json  # noqa: E402
from hcd.scoring import bootstrap_auc  # noqa: E402


def per_resample_loop(y: np.ndarray, p: np.ndarray, n: int, seed: int) -> np.ndarray:
    """What hcd did before: the AUCs of ``n`` stratified resamples, one roc_auc_score each."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = np.empty(n)
    for i in range(n):
        s = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        aucs[i] = roc_auc_score(y[s], p[s])
    return aucs


def predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (40 % positive, as Kaggle's) and float32 probabilities with an AUC near 0.95."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    p = 1 / (1 + np.exp(-(2.3 * (2 * y - 1) + rng.normal(0, 1.5, n))))
    return y, p.astype(np.float32)


def compare(n: int, resamples: int, loop_budget_s: float) -> dict:
    y, p = predictions(n)
    roc_auc_score(y, p)  # the library's first-call costs out of the timing
    t = time.perf_counter()
    fast = bootstrap_auc(y, p, resamples, seed=0)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    probe = per_resample_loop(y, p, 5, seed=0)
    per = (time.perf_counter() - t) / 5
    timed = resamples if per * resamples <= loop_budget_s else max(5, int(loop_budget_s / per))
    t = time.perf_counter()
    aucs = per_resample_loop(y, p, timed, seed=0)
    t_loop = (time.perf_counter() - t) / timed * resamples
    assert np.array_equal(aucs[:5], probe)
    row = {"n": n, "resamples": resamples, "count_bootstrap_s": round(t_fast, 3), "per_resample_loop_s": round(t_loop, 2), "loop_resamples_timed": timed, "ratio_loop_over_count": round(t_loop / t_fast, 1)}
    if timed == resamples:  # the same resamples on both sides: the intervals must agree
        row["max_interval_difference"] = float(np.max(np.abs(np.subtract(fast, np.percentile(aucs, [2.5, 97.5])))))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 22003, 220025])
    ap.add_argument("--loop-budget", type=float, default=60.0, help="seconds the per-resample loop may take per size before it is timed on fewer resamples")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results.json"))
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        rows.append(row := compare(n, args.resamples, args.loop_budget))
        agree = f", intervals differ by {row['max_interval_difference']:.1e}" if "max_interval_difference" in row else ""
        print(f"n={n:>7}: {args.resamples} resamples — count bootstrap {row['count_bootstrap_s']:.3f} s, roc_auc_score per resample {row['per_resample_loop_s']:.1f} s (timed on {row['loop_resamples_timed']}): ratio {row['ratio_loop_over_count']}{agree}", flush=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["scoring_bootstrap"] = {"measured": f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU (benchmarks/bench_scoring.py)", "rows": rows}
    write_json(out, results)
    print(f"wrote {out} (scoring_bootstrap)")


if __name__ == "__main__":
    main()
