"""Stage ``stats``: per-channel mean and std of the training side.

One streaming pass over the packed array (chunks of rows, never the whole
array in memory), validation rows and outliers excluded. Sums of pixels and of
their squares are accumulated in unsigned 64-bit integers — exact for any
dataset size (float64 accumulation would also do; integers cost the same and
leave no rounding at all) — and turned into float64 mean/std once at the end.
Writes ``stats.json``, which training reads for normalisation. With
``split.folds: K`` it holds one entry per fold (``folds``), each from that
fold's training side only, so no fold model is normalised with statistics of
the patches it is judged on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hcd.atomic import clean_stale_temps, write_json
from hcd.data.packed import held_out, open_packed, read_split
from hcd.errors import HcdError


def channel_stats(x: np.ndarray, rows: np.ndarray, chunk_rows: int = 1024) -> dict:
    """Mean and population std per channel of ``x[rows]`` (uint8 N x H x W x 3), on the 0..1 scale."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise HcdError("stats: no training rows to compute statistics from")
    s1 = np.zeros(3, dtype=np.uint64)
    s2 = np.zeros(3, dtype=np.uint64)
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(x[rows[start : start + chunk_rows]]).reshape(-1, 3)  # (chunk*H*W, 3) uint8
        s1 += block.sum(axis=0, dtype=np.uint64)
        sq = block.astype(np.uint16)
        sq *= sq  # 255^2 fits in uint16
        s2 += sq.sum(axis=0, dtype=np.uint64)
    n = len(rows) * int(np.prod(x.shape[1:3]))
    # exact integer arithmetic until the final division
    mean = [int(a) / n for a in s1]
    var = [(int(b) * n - int(a) * int(a)) / (n * n) for a, b in zip(s1, s2)]
    return {
        "mean": [m / 255.0 for m in mean],
        "std": [float(np.sqrt(v)) / 255.0 for v in var],
        "mean_255": mean,
        "std_255": [float(np.sqrt(v)) for v in var],
        "n_patches": int(len(rows)),
        "n_pixels": int(n),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd stats", description=__doc__.splitlines()[0])
    ap.add_argument("packed", help="packed training patches (data/packed/train_x.npy)")
    ap.add_argument("index", help="their index (data/packed/train_index.csv)")
    ap.add_argument("split", help="train/validation sides (data/split/split.csv)")
    ap.add_argument("--out", required=True, help="per-channel mean and std (data/stats/stats.json)")
    args = ap.parse_args(argv)
    clean_stale_temps(args.out)
    x = open_packed(args.packed)
    index, sides = read_split(args.index, args.split, n_rows=len(x))
    inlier = (index["outlier"].to_numpy() == 0) if "outlier" in index.columns else np.ones(len(index), dtype=bool)
    per_fold = [channel_stats(x, index["row"].to_numpy()[~held & inlier]) for held in held_out(sides, args.split)]
    stats = per_fold[0] if "fold" not in sides.columns else {"folds": per_fold}
    write_json(Path(args.out), stats)
    for i, st in enumerate(per_fold):
        where = f" (fold {i})" if len(per_fold) > 1 else ""
        print(f"stats{where}: {st['n_patches']} patches, mean {[round(v, 4) for v in st['mean']]}, std {[round(v, 4) for v in st['std']]}", file=sys.stderr)
