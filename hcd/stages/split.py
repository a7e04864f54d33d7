"""Stage ``split``: stratified train/validation split or K folds, grouped by slide when known.

Without groups: a stratified random split (``split.val_fraction``,
``split.seed``). With ``split.groups`` (a CSV ``id,group`` — e.g. the slide
each patch was cut from, kept in ``data/groups/``; Kaggle's shared
``patch_id_wsi_full.csv`` with columns ``id,wsi`` is taken as it comes): a
stratified *group* split, so no slide is on both sides. Neighbouring patches of
one slide look alike; a random split of them inflates validation AUC.

``split.folds: K`` (K >= 2): stratified K-fold (grouped with ``split.groups``: no
slide in two folds); every labelled patch is held out by exactly one fold.

Writes ``split.csv`` — row, id, label, side (train/val) with one split, or
row, id, label, fold (the fold that holds the patch out) with K folds — and a
balance JSON (count and positive fraction per side or per fold; in git, beside
the metrics).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from hcd.atomic import Commit, clean_stale_temps
from hcd.data.packed import read_index
from hcd.errors import HcdError, excerpt
from hcd.pipeline.params import SplitParams, load_params


def read_groups(path: str | Path, ids: pd.Series) -> np.ndarray:
    """Group (slide) of every id, from a CSV with columns id,group."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HcdError(f"{path}: groups file not found (split.groups in params.yaml)") from None
    try:
        groups = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise HcdError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    groups.columns = [c.strip().lower() for c in groups.columns]
    if "group" not in groups.columns and "wsi" in groups.columns:  # Kaggle's shared patch_id_wsi_full.csv
        groups = groups.rename(columns={"wsi": "group"})
    if not {"id", "group"} <= set(groups.columns):
        raise HcdError(f"{path}: expected header 'id,group' (or 'id,wsi'), found {excerpt(','.join(groups.columns))}")
    if groups["id"].duplicated().any():
        raise HcdError(f"{path}: id {excerpt(groups.loc[groups['id'].duplicated(), 'id'].iloc[0])} appears twice")
    mapping = groups.set_index("id")["group"]
    got = ids.map(mapping)
    if got.isna().any():
        raise HcdError(f"{path}: {int(got.isna().sum())} train ids have no group (first: {ids[got.isna()].iloc[0]})")
    return got.to_numpy()


def split(index: pd.DataFrame, p: SplitParams, groups: np.ndarray | None = None, warn=print) -> np.ndarray:
    """Boolean mask: True for validation rows. Refuses a split that cannot be honest (see :func:`check_honest`)."""
    y = index["label"].to_numpy()
    n = len(index)
    if n < 4 or min(np.bincount(y, minlength=2)) < 2:
        raise HcdError(f"split: need at least 2 patches of each class, found {np.bincount(y, minlength=2).tolist()}")
    val = np.zeros(n, dtype=bool)
    if groups is None:
        n_val = int(np.ceil(p.val_fraction * n))
        if n_val < 2 or n - n_val < 2:
            raise HcdError(f"split: split.val_fraction {p.val_fraction} of {n} patches leaves {n_val} for validation and {n - n_val} for training; each side needs at least 2")
        try:
            _, val_idx = train_test_split(np.arange(n), test_size=p.val_fraction, stratify=y, random_state=p.seed)
        except ValueError as exc:  # too few patches of a class for the fraction asked
            raise HcdError(f"split: cannot split {n} patches ({int(y.sum())} positive) with split.val_fraction {p.val_fraction} ({str(exc).splitlines()[0]})") from None
    else:
        n_groups = len(np.unique(groups))
        k = int(round(1.0 / p.val_fraction))
        if n_groups < 2:
            raise HcdError("split: the groups file puts every patch in one group; nothing to split by")
        k = max(2, min(k, n_groups))
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=p.seed)
        _, val_idx = next(folds.split(np.zeros(n), y, groups))
    val[val_idx] = True
    check_honest(y, val, p, groups, warn)
    return val


def assign_folds(index: pd.DataFrame, p: SplitParams, groups: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..K-1) that holds each row out: stratified, grouped when ``groups`` is given.
    Refuses, naming ``split.folds`` and the numbers, folds that cannot each hold both classes."""
    y = index["label"].to_numpy()
    k = p.folds
    counts = np.bincount(y, minlength=2)
    if counts.min() < k:
        cls = "positive" if counts[1] < counts[0] else "negative"
        raise HcdError(f"split: split.folds {k} needs at least {k} patches of each class; there are {int(counts.min())} {cls} ({len(y)} patches)")
    fold = np.full(len(y), -1, dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=p.seed)
        parts = splitter.split(np.zeros(len(y)), y)
    else:
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise HcdError(f"split: split.folds {k} needs at least {k} groups; {p.groups} has {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=p.seed)
        parts = splitter.split(np.zeros(len(y)), y, groups)
    for i, (_, held) in enumerate(parts):
        fold[held] = i
    for i in range(k):
        held = fold == i
        pos = int(y[held].sum())
        if pos == 0 or pos == held.sum():
            how = f" (the groups in {p.groups} do not spread the classes over {k} folds)" if groups is not None else ""
            raise HcdError(f"split: split.folds {k}: fold {i} holds {int(held.sum()) - pos} negative and {pos} positive patches; each fold needs both classes{how}; use fewer folds")
    return fold


def fold_balance(index: pd.DataFrame, fold: np.ndarray, groups: np.ndarray | None) -> dict:
    """Size, positives and groups of each fold; with groups, how many groups sit in two folds (0 by construction)."""
    y = index["label"].to_numpy()
    per = []
    for i in range(int(fold.max()) + 1):
        held = fold == i
        rec = {"fold": i, "n": int(held.sum()), "positive": int(y[held].sum()), "positive_fraction": round(float(y[held].mean()), 4)}
        if groups is not None:
            rec["groups"] = int(len(np.unique(groups[held])))
        per.append(rec)
    out: dict = {"folds": len(per), "per_fold": per, "grouped": groups is not None}
    if groups is not None:
        owners = pd.DataFrame({"g": groups, "f": fold}).groupby("g")["f"].nunique()
        out["groups_in_two_folds"] = int((owners > 1).sum())
    return out


def check_honest(y: np.ndarray, val: np.ndarray, p: SplitParams, groups: np.ndarray | None, warn=print) -> None:
    """Refuse a side holding one class, or a grouped split far from ``val_fraction``; warn when groups track the label."""
    for side, mask in (("validation", val), ("training", ~val)):
        pos = int(y[mask].sum())
        if mask.sum() == 0 or pos == 0 or pos == mask.sum():
            how = f" by the groups in {p.groups}" if groups is not None else ""
            raise HcdError(f"split: the {side} side{how} holds {int(mask.sum()) - pos} negative and {pos} positive patches; AUC needs both classes (use more groups, or other split.* params)")
    if groups is None:
        return
    n_groups = len(np.unique(groups))
    got = float(val.mean())
    if got > 2 * p.val_fraction + 0.02 or got < p.val_fraction / 2:
        need = int(np.ceil(1 / p.val_fraction))
        raise HcdError(f"split: {n_groups} groups in {p.groups} give a validation side of {got:.1%} against split.val_fraction {p.val_fraction}; a grouped split at that fraction needs about {need} groups or more (or set split.val_fraction near {1 / n_groups:.2f})")
    pos_val, pos_train = float(y[val].mean()), float(y[~val].mean())
    if abs(pos_val - pos_train) > 0.15:
        warn(f"split: warning: positive fraction {pos_val:.2f} on the validation side against {pos_train:.2f} on the training side: the groups in {p.groups} track the label, so validation AUC is not comparable to an ungrouped split")
    explained = label_variance_explained(y, groups)
    if explained > 0.6:
        warn(f"split: warning: the groups in {p.groups} explain {explained:.0%} of the label variance (slides of mostly one class): validation AUC will read far lower than an ungrouped split's, and folds may come out unbalanced")


def label_variance_explained(y: np.ndarray, groups: np.ndarray) -> float:
    """Share of the label's variance between groups (eta squared): 1 when each group holds one class."""
    frame = pd.DataFrame({"g": groups, "y": y.astype(float)})
    total = float(frame["y"].var(ddof=0))
    if total == 0:
        return 0.0
    means = frame.groupby("g")["y"].transform("mean")
    return float(((means - frame["y"].mean()) ** 2).mean() / total)


def balance(index: pd.DataFrame, val: np.ndarray, groups: np.ndarray | None) -> dict:
    out: dict = {}
    for side, mask in (("train", ~val), ("val", val)):
        lab = index["label"].to_numpy()[mask]
        out[side] = {"n": int(mask.sum()), "positive": int(lab.sum()), "positive_fraction": round(float(lab.mean()), 4) if len(lab) else 0.0}
        if groups is not None:
            out[side]["groups"] = int(len(np.unique(groups[mask])))
    out["val_fraction"] = round(float(val.mean()), 4)
    out["grouped"] = groups is not None
    if groups is not None:
        out["groups_on_both_sides"] = int(len(set(groups[val]) & set(groups[~val])))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd split", description=__doc__.splitlines()[0])
    ap.add_argument("index", help="the packed training index (data/packed/train_index.csv)")
    ap.add_argument("--out", required=True, help="row,id,label,side per patch (data/split/split.csv)")
    ap.add_argument("--balance", required=True, help="counts per side, kept in git (metrics/split.json)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads split.*)")
    args = ap.parse_args(argv)
    p = load_params(args.params).split
    clean_stale_temps(args.out, args.balance)
    index = read_index(args.index)
    groups = read_groups(p.groups, index["id"]) if p.groups else None
    if p.folds >= 2:
        fold = assign_folds(index, p, groups)
        frame = index[["row", "id", "label"]].assign(fold=fold)
        bal = fold_balance(index, fold, groups)
        said = f"split: {p.folds} folds of {', '.join(str(f['n']) for f in bal['per_fold'])} patches, positive fraction {', '.join(str(f['positive_fraction']) for f in bal['per_fold'])}"
    else:
        val = split(index, p, groups, warn=lambda m: print(m, file=sys.stderr))
        frame = index[["row", "id", "label"]].assign(side=np.where(val, "val", "train"))
        bal = balance(index, val, groups)
        said = f"split: {bal['train']['n']} train / {bal['val']['n']} val, positive fraction {bal['train']['positive_fraction']} / {bal['val']['positive_fraction']}"
    with Commit() as commit:
        commit.csv(args.out, frame)
        commit.json(args.balance, bal)
    print(said, file=sys.stderr)
