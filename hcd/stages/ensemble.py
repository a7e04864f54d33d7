"""Stage ``ensemble``: combine the backbones, write the Kaggle ``submission.csv``.

``ensemble.method``:

* ``mean``  — the mean of the backbones' probabilities;
* ``rank``  — the mean of their ranks (scaled to [0, 1]), robust to calibration differences;
* ``stack`` — a logistic regression on the backbones' logits, fitted on the validation
  side; its validation predictions are cross-validated (5 folds), so the reported
  validation AUC is not fitted on itself. With ``split.folds: K`` it is fitted on the
  out-of-fold predictions of every labelled patch, cross-validated over the split's
  own folds (grouped by slide when ``split.groups`` is set), so no patch is scored
  by a stacker that saw it or its slide.

The submission is validated before it is written: header ``id,label``, one row per
``sample_submission.csv`` id in its order, probabilities in [0, 1], no NaN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_predict

from hcd.atomic import Commit, clean_stale_temps
from hcd.errors import HcdError, excerpt
from hcd.model.combine import rank_mean, stack_logits
from hcd.pipeline.params import load_params
from hcd.pipeline.table import per_backbone


def combine(method: str, val: np.ndarray, test: np.ndarray, y_val: np.ndarray, seed: int = 0, fold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """val (n_val, k) and test (n_test, k) probabilities -> combined (val, test, the stacker's fit: weights and intercept).
    ``fold``: the split's fold of each validation row (out-of-fold predictions); the stacker is cross-validated over it."""
    if method == "mean":
        return val.mean(1), test.mean(1), None
    if method == "rank":
        return rank_mean(val), rank_mean(test), None
    if method == "stack":
        z_val, z_test = stack_logits(val), stack_logits(test)
        lr = LogisticRegression(C=1.0, max_iter=1000)
        folds = StratifiedKFold(5, shuffle=True, random_state=seed) if fold is None else PredefinedSplit(fold)
        cv = cross_val_predict(lr, z_val, y_val, cv=folds, method="predict_proba")[:, 1]
        lr.fit(z_val, y_val)
        return cv, lr.predict_proba(z_test)[:, 1], {"weights": [float(w) for w in lr.coef_[0]], "intercept": float(lr.intercept_[0])}
    raise HcdError(f"params.yaml: ensemble.method: unknown method {method!r}")


def validate_submission(sub: pd.DataFrame, expected_ids: list[str], where: str) -> None:
    """One-line error unless ``sub`` is exactly what Kaggle takes."""
    if list(sub.columns) != ["id", "label"]:
        raise HcdError(f"{where}: header must be 'id,label', found {excerpt(','.join(map(str, sub.columns)))}")
    ids = sub["id"].tolist()
    if ids != expected_ids:
        missing = set(expected_ids) - set(ids)
        extra = set(ids) - set(expected_ids)
        if missing:
            raise HcdError(f"{where}: {len(missing)} sample_submission ids missing (first: {excerpt(sorted(missing)[0])})")
        if extra:
            raise HcdError(f"{where}: {len(extra)} ids not in sample_submission (first: {excerpt(sorted(extra)[0])})")
        if len(ids) != len(set(ids)):
            raise HcdError(f"{where}: duplicate ids")
        raise HcdError(f"{where}: ids are not in sample_submission order")
    p = pd.to_numeric(sub["label"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(p).any():
        raise HcdError(f"{where}: {int(np.isnan(p).sum())} labels are NaN or not numbers (first id: {excerpt(sub['id'][np.isnan(p)].iloc[0])})")
    if (p < 0).any() or (p > 1).any():
        raise HcdError(f"{where}: labels must be probabilities in [0, 1] (found {p.min():.3g} .. {p.max():.3g})")


def ensemble(val_files: dict[str, Path], test_files: dict[str, Path], test_index: Path, method: str, val_out: Path, fit_out: Path, submission: Path, seed: int, log=print) -> dict:
    """``val_files``/``test_files``: each backbone's predictions, in params.yaml's order."""
    backbones = list(val_files)
    vals, tests = [], []
    for b in backbones:
        try:
            vals.append(pd.read_csv(val_files[b], dtype={"id": str}))
            tests.append(pd.read_csv(test_files[b], dtype={"id": str}))
        except FileNotFoundError as exc:
            raise HcdError(f"{exc.filename}: not found (run predict for {b})") from None
    for b, v, t in zip(backbones, vals, tests):
        if not (v["id"].equals(vals[0]["id"]) and t["id"].equals(tests[0]["id"])):
            raise HcdError(f"{val_files[b]}: predictions are for other ids than {backbones[0]}'s (rerun predict)")
    folded = "fold" in vals[0].columns
    for b, v in zip(backbones, vals):
        if ("fold" in v.columns) != folded or (folded and not v["fold"].equals(vals[0]["fold"])):
            raise HcdError(f"{val_files[b]}: other folds than {backbones[0]}'s (rerun train and predict after split)")
    y = vals[0]["label"].to_numpy()
    fold = vals[0]["fold"].to_numpy() if folded else None
    pv = np.stack([v["prob"].to_numpy() for v in vals], 1)
    pt = np.stack([t["prob"].to_numpy() for t in tests], 1)
    cv, ct, fit = combine(method, pv, pt, y, seed, fold)
    expected = pd.read_csv(test_index, dtype={"id": str}, keep_default_na=False)["id"].tolist()
    sub = pd.DataFrame({"id": tests[0]["id"], "label": np.clip(ct, 0.0, 1.0)})
    validate_submission(sub, expected, str(submission))
    # the stacker's weights (on each backbone's logit) and intercept: hcd infer and the export bundle apply them
    info = {"method": method, "backbones": backbones, **(fit or {"weights": None, "intercept": None})}
    with Commit() as commit:
        commit.csv(val_out, pd.DataFrame({"id": vals[0]["id"], "label": y, **({"fold": fold} if folded else {}), "prob": cv}))
        commit.csv(submission, sub)
        commit.json(fit_out, info)
    log(f"ensemble: {method} of {', '.join(backbones)} -> {submission} ({len(sub)} rows)")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd ensemble", description=__doc__.splitlines()[0])
    ap.add_argument("--val", required=True, help="each backbone's held-out predictions, {item} standing for its name (predictions/{item}/val.csv)")
    ap.add_argument("--test", required=True, help="each backbone's test predictions (predictions/{item}/test.csv)")
    ap.add_argument("--test-index", required=True, help="test ids in sample_submission order (data/packed/test_index.csv)")
    ap.add_argument("--val-out", required=True, help="the ensemble's held-out predictions (results/ensemble/val.csv)")
    ap.add_argument("--fit-out", required=True, help="the method and the stacker's weights (results/ensemble/ensemble.json)")
    ap.add_argument("--submission", required=True, help="the Kaggle file to write (results/submission.csv)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads backbones, ensemble.*, seed)")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    clean_stale_temps(args.val_out, args.fit_out, args.submission)
    vals, tests = per_backbone(args.val, p.backbones), per_backbone(args.test, p.backbones)
    ensemble(vals, tests, Path(args.test_index), p.ensemble.method, Path(args.val_out), Path(args.fit_out), Path(args.submission), p.seed, log=lambda m: print(m, file=sys.stderr))
