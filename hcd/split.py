"""Stage ``split``: stratified train/validation split, grouped by slide when known.

Without groups: a stratified random split (``split.val_fraction``,
``split.seed``). With ``split.groups`` (a CSV ``id,group`` — e.g. the slide
each patch was cut from, kept in ``data/groups/``): a stratified *group* split,
so no slide is on both sides. Neighbouring patches of one slide look alike; a
random split of them inflates validation AUC.

Writes ``split.csv`` (row, id, label, side) and a balance JSON (count and
positive fraction per side; a DVC metric).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from hcd.errors import HcdError
from hcd.io import Commit, clean_stale_temps
from hcd.params import SplitParams, load_params


def read_index(path: str | Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"id": str})
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run the scan stage first)") from None
    missing = {"row", "id", "label"} - set(frame.columns)
    if missing:
        raise HcdError(f"{path}: missing columns {sorted(missing)}")
    return frame


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
    if not {"id", "group"} <= set(groups.columns):
        raise HcdError(f"{path}: expected header 'id,group', found '{','.join(groups.columns)[:80]}'")
    if groups["id"].duplicated().any():
        raise HcdError(f"{path}: id {groups.loc[groups['id'].duplicated(), 'id'].iloc[0]} appears twice")
    mapping = groups.set_index("id")["group"]
    got = ids.map(mapping)
    if got.isna().any():
        raise HcdError(f"{path}: {int(got.isna().sum())} train ids have no group (first: {ids[got.isna()].iloc[0]})")
    return got.to_numpy()


def split(index: pd.DataFrame, p: SplitParams, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask: True for validation rows."""
    y = index["label"].to_numpy()
    n = len(index)
    if n < 4 or min(np.bincount(y, minlength=2)) < 2:
        raise HcdError(f"split: need at least 2 patches of each class, found {np.bincount(y, minlength=2).tolist()}")
    val = np.zeros(n, dtype=bool)
    if groups is None:
        _, val_idx = train_test_split(np.arange(n), test_size=p.val_fraction, stratify=y, random_state=p.seed)
    else:
        n_groups = len(np.unique(groups))
        k = int(round(1.0 / p.val_fraction))
        if n_groups < 2:
            raise HcdError("split: the groups file puts every patch in one group; nothing to split by")
        k = max(2, min(k, n_groups))
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=p.seed)
        _, val_idx = next(folds.split(np.zeros(n), y, groups))
    val[val_idx] = True
    return val


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
    ap = argparse.ArgumentParser(prog="split", description=__doc__.splitlines()[0])
    ap.add_argument("index", help="data/packed/train_index.csv")
    ap.add_argument("--out", default="data/split/split.csv")
    ap.add_argument("--balance", default="metrics/split.json", help="counts per side (a DVC metric)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params).split
    clean_stale_temps(args.out, args.balance)
    index = read_index(args.index)
    groups = read_groups(p.groups, index["id"]) if p.groups else None
    val = split(index, p, groups)
    frame = index[["row", "id", "label"]].assign(side=np.where(val, "val", "train"))
    bal = balance(index, val, groups)
    with Commit() as commit:
        commit.csv(args.out, frame)
        commit.json(args.balance, bal)
    print(f"split: {bal['train']['n']} train / {bal['val']['n']} val, positive fraction {bal['train']['positive_fraction']} / {bal['val']['positive_fraction']}", file=sys.stderr)
