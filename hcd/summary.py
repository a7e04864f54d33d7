"""``hcd summary``: what the last run produced, from the files either engine wrote.

Per backbone and for the ensemble: validation AUC with its bootstrap 95 %
interval (``metrics/metrics.json``), the best epoch (``dvclive/<backbone>/metrics.json``),
and where the Kaggle submission is. The metrics stage prints it at the end of
every run that reaches it; ``hcd summary`` prints it again at any time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary_lines(root: Path = Path(".")) -> list[str]:
    metrics = _load(root / "metrics/metrics.json")
    if not metrics:
        return ["hcd summary: no metrics/metrics.json yet — run `dvc repro` or `snakemake --cores all` first"]
    names = [k for k, v in metrics.items() if isinstance(v, dict) and "auc" in v and k != "ensemble"] + (["ensemble"] if "ensemble" in metrics else [])
    demo = any("test" in metrics[n] for n in names)  # the demo knows its test labels: both sides side by side
    head = f"{'':<12} {'validation AUC (95 % CI)':<26} {'best epoch':>10}"
    lines = [head + (f"   {'test AUC (95 % CI), unseen slides':<34}" if demo else ""), "-" * (50 + (37 if demo else 0))]
    for name in names:
        m = metrics[name]
        live = _load(root / f"dvclive/{name}/metrics.json") or {}
        epoch = live.get("best/epoch", "") if name != "ensemble" else ""
        lo, hi = m.get("auc_ci95", [float("nan")] * 2)
        line = f"{name:<12} {m['auc']:.4f} ({lo:.4f}-{hi:.4f}){'':<3} {epoch!s:>10}"
        if "test" in m:
            t = m["test"]
            line += f"   {t['auc']:.4f} ({t['auc_ci95'][0]:.4f}-{t['auc_ci95'][1]:.4f})"
        lines.append(line)
    if demo:
        lines.append("(demo: the test labels are the generator's; validation above test is what a split that mixes slides leaks)")
    sub = root / "results/submission.csv"
    if sub.exists():
        with open(sub) as fh:
            rows = sum(1 for _ in fh) - 1
        lines.append(f"submission: {sub} ({rows:,} rows; upload it to Kaggle, or `hcd score {sub} LABELS.csv`)")
    else:
        lines.append("submission: results/submission.csv not written yet")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd summary", description="the last run's validation AUCs, best epochs and submission, from the files on disk")
    ap.add_argument("--root", default=".", help="the repository to read (default: the current folder)")
    args = ap.parse_args(argv)
    print("\n".join(summary_lines(Path(args.root))), file=sys.stdout)
