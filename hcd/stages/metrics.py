"""Stage ``metrics``, and ``hcd score``: how good are the predictions?

Per backbone and for the ensemble, on the validation side: ROC AUC with a
bootstrap 95 % interval, log loss, and accuracy / sensitivity / specificity at
0.5 and at the Youden threshold (max sensitivity + specificity - 1). Writes
``metrics/metrics.json`` (in git), the AUCs with their intervals to
``metrics/summary.json`` (the top-level DVC metric), and ROC, precision-recall and
confusion-matrix data under ``plots/`` (top-level DVC plots).

On the demo (``data.source: demo``), whose test labels the generator knows, each backbone's
test predictions and the submission are scored too (``test`` in metrics.json, and a column of
``hcd summary``): the validation AUC beside the test AUC of unseen slides shows what a random
split's leak is worth, as it would on real data if Kaggle's test labels were public.

With ``split.folds: K`` the predictions scored are out-of-fold (every labelled
patch, each from the model that did not train on it), and each backbone and the
ensemble also get the AUC of every fold with its mean, std, min and max
(``folds`` in metrics.json; the std as ``auc_fold_std`` in summary.json).

The scores themselves come from :mod:`hcd.scoring` (also behind ``hcd score``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from hcd import env
from hcd.atomic import Commit, clean_stale_temps
from hcd.errors import HcdError
from hcd.pipeline.params import load_params
from hcd.pipeline.table import per_backbone
from hcd.scoring import score

MAX_CURVE_POINTS = 400  # plots stay small enough for git


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame) <= MAX_CURVE_POINTS:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, MAX_CURVE_POINTS).round().astype(int))
    return frame.iloc[keep]


def evaluate(val_files: dict[str, Path], ensemble_val: Path, metrics_out: Path, summary_out: Path, curve_files: dict[str, Path], n_boot: int, seed: int, log=print, tests: dict[str, dict] | None = None) -> dict:
    """``val_files``: each backbone's held-out predictions, in params.yaml's order; ``curve_files``: where
    the ``roc``, ``prc`` and ``confusion`` data go; ``tests``: the demo's test scores (:func:`demo_test_scores`)."""
    backbones = list(val_files)
    sources = {**val_files, "ensemble": ensemble_val}
    out: dict = {}
    curves: dict[str, dict] = {}
    for name, path in sources.items():
        try:
            frame = pd.read_csv(path, dtype={"id": str})
        except FileNotFoundError:
            raise HcdError(f"{path}: not found (run predict / ensemble first)") from None
        y, p = frame["label"].to_numpy(), frame["prob"].to_numpy()
        out[name] = score(y, p, n_boot, seed)
        if "fold" in frame.columns:
            out[name]["folds"] = fold_spread(y, p, frame["fold"].to_numpy())
        fpr, tpr, _ = roc_curve(y, p)
        prec, rec, _ = precision_recall_curve(y, p)
        curves.setdefault("roc", {"roc": []})["roc"] += _thin(pd.DataFrame({"model": name, "fpr": fpr, "tpr": tpr})).assign(order=lambda f: range(len(f))).to_dict("records")
        curves.setdefault("prc", {"prc": []})["prc"] += _thin(pd.DataFrame({"model": name, "recall": rec, "precision": prec})).assign(order=lambda f: range(len(f))).to_dict("records")
        if name == "ensemble":
            pred = (p >= 0.5).astype(int)
            curves["confusion"] = {"confusion": [{"actual": int(a), "predicted": int(b)} for a, b in zip(y, pred)]}
        m = out[name]
        if "folds" in m:
            log(f"metrics {name}: out-of-fold; AUC per fold {', '.join(f'{a:.4f}' for a in m['folds']['auc'])} (std {m['folds']['std']:.4f})")
        log(f"metrics {name}: AUC {m['auc']:.4f} [{m['auc_ci95'][0]:.4f}, {m['auc_ci95'][1]:.4f}], log loss {m['log_loss']:.4f}, accuracy {m['at_0.5']['accuracy']:.4f}")
    for name, test in (tests or {}).items():  # the demo's test side, against the generator's labels
        out[name]["test"] = test
        log(f"metrics {name}: test AUC {test['auc']:.4f} [{test['auc_ci95'][0]:.4f}, {test['auc_ci95'][1]:.4f}] (demo test labels, {test['n']} patches of unseen slides)")
    best = max(backbones, key=lambda b: out[b]["auc"])
    out["summary"] = {"ensemble_auc": out["ensemble"]["auc"], "best_single": best, "best_single_auc": out[best]["auc"]}
    out["environment"] = env.environment()  # the versions behind these numbers (each model.json has its training's)
    with Commit() as commit:  # all five files or none
        for name, obj in curves.items():
            commit.path(curve_files[name]).write_text(json.dumps(obj, indent=2) + "\n")
        commit.json(metrics_out, out)
        commit.json(summary_out, {name: summary_entry(out[name]) for name in [*backbones, "ensemble"]})
    return out


def demo_test_scores(demo, test_files: dict[str, Path], submission: Path, n_boot: int, seed: int) -> dict[str, dict]:
    """Each backbone's test predictions and the submission scored against the demo's test labels (the
    generator's, as annotated: a few are disputed, as on real data)."""
    from hcd.data.synth import truth

    labels = truth(demo).test[["id", "label"]]
    out = {}
    for name, path in {**test_files, "ensemble": submission}.items():
        try:
            pred = pd.read_csv(path, dtype={"id": str})
        except FileNotFoundError:
            raise HcdError(f"{path}: not found (run predict / ensemble first)") from None
        col = "prob" if "prob" in pred.columns else "label"
        merged = labels.merge(pred[["id", col]].rename(columns={col: "p"}), on="id", how="inner")  # planted unreadable ones are not predicted
        out[name] = {k: v for k, v in score(merged["label"].to_numpy(), merged["p"].to_numpy(dtype=float), n_boot, seed).items() if k in ("auc", "auc_ci95", "n")}
    return out


def fold_spread(y: np.ndarray, p: np.ndarray, fold: np.ndarray) -> dict:
    """AUC of each fold's held-out patches, and how much they differ."""
    aucs = [float(roc_auc_score(y[fold == k], p[fold == k])) for k in range(int(fold.max()) + 1)]
    return {"auc": aucs, "mean": float(np.mean(aucs)), "std": float(np.std(aucs)), "min": min(aucs), "max": max(aucs)}


def summary_entry(m: dict) -> dict:
    """What `dvc metrics diff` and `dvc exp show` compare: AUC, its 95 % interval, and the spread over folds."""
    entry = {"auc": m["auc"], "auc_ci95_low": m["auc_ci95"][0], "auc_ci95_high": m["auc_ci95"][1]}
    if "folds" in m:
        entry["auc_fold_std"] = m["folds"]["std"]
    return entry


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd metrics", description=__doc__.splitlines()[0])
    ap.add_argument("--val", required=True, help="each backbone's held-out predictions, {item} standing for its name (predictions/{item}/val.csv)")
    ap.add_argument("--ensemble", required=True, help="the ensemble's validation predictions (results/ensemble/val.csv)")
    ap.add_argument("--out", required=True, help="every metric, per backbone and for the ensemble (metrics/metrics.json)")
    ap.add_argument("--summary", required=True, help="AUC and 95 %% interval per backbone and ensemble: the DVC metric (metrics/summary.json)")
    ap.add_argument("--roc", required=True, help="ROC curve of each backbone and the ensemble: a DVC plot (plots/roc.json)")
    ap.add_argument("--prc", required=True, help="precision-recall curves (plots/prc.json)")
    ap.add_argument("--confusion", required=True, help="the ensemble's predictions at 0.5 against the labels (plots/confusion.json)")
    ap.add_argument("--test", help="each backbone's test predictions (predictions/{item}/test.csv): scored on the demo, whose test labels are known")
    ap.add_argument("--submission", help="the ensemble's test predictions (results/submission.csv): scored on the demo")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads backbones, data, metrics.*)")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    curve_files = {"roc": Path(args.roc), "prc": Path(args.prc), "confusion": Path(args.confusion)}
    clean_stale_temps(args.out, args.summary, *curve_files.values())
    tests = None
    if p.data.source == "demo":
        if not (args.test and args.submission):
            raise HcdError("metrics: on the demo, --test and --submission score the test side against the generator's labels")
        tests = demo_test_scores(p.data.demo, per_backbone(args.test, p.backbones), Path(args.submission), p.metrics.bootstrap, p.metrics.seed)
    evaluate(per_backbone(args.val, p.backbones), Path(args.ensemble), Path(args.out), Path(args.summary), curve_files, p.metrics.bootstrap, p.metrics.seed, log=lambda m: print(m, file=sys.stderr), tests=tests)
    from hcd.summary import summary_lines  # the run's last words: what came out, and where

    print("\n".join(["", "hcd: this run's results", *summary_lines()]), file=sys.stderr)


