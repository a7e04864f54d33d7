"""Stage ``stats``: per-channel mean and std of the training side.

One streaming pass over the packed array (chunks of rows, never the whole
array in memory), validation rows and outliers excluded. Sums of pixels and of
their squares are accumulated in unsigned integers — exact for any dataset size
(float64 accumulation would also do; integers cost the same and leave no
rounding at all) — and turned into float64 mean/std once at the end. Writes
``stats.json``, which training reads for normalisation. With ``split.folds: K``
it holds one entry per fold (``folds``), each from that fold's training side
only, so no fold model is normalised with statistics of the patches it is
judged on; the one pass sums each fold's rows once, and each training side adds
the sums of the folds it keeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hcd.atomic import clean_stale_temps, write_json
from hcd.data.packed import held_out, open_packed, read_split
from hcd.errors import HcdError

CHUNK_ROWS = 256  # rows summed at once: 256 x 255^2 fits the uint32 accumulators (up to 66,051 would)


def channel_sums(x: np.ndarray, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact sums of the pixels and of their squares per channel over ``x[rows]`` (uint8 N x H x W x 3), as uint64.

    Each chunk is summed down its rows, one accumulator per byte of a patch (contiguous, so
    vectorised), in uint32, and only then folded to the three channels in uint64: 11.7 x the
    throughput of reducing (pixels, 3) columns directly (68 → 800 MB/s on 2 cores: 67 s → 7.6 s
    for Kaggle's 6.1 GB training array), with the same integers."""
    if not 0 < chunk_rows <= (2**32 - 1) // 255**2:
        raise ValueError(f"chunk_rows {chunk_rows}: the uint32 accumulators would overflow")
    s1 = np.zeros(3, dtype=np.uint64)
    s2 = np.zeros(3, dtype=np.uint64)
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(x[rows[start : start + chunk_rows]]).reshape(-1, x[0].size)  # (chunk, H*W*3) uint8
        s1 += np.add.reduce(block, axis=0, dtype=np.uint32).reshape(-1, 3).sum(axis=0, dtype=np.uint64)
        square = np.square(block, dtype=np.uint16)  # 255^2 fits in uint16
        s2 += np.add.reduce(square, axis=0, dtype=np.uint32).reshape(-1, 3).sum(axis=0, dtype=np.uint64)
    return s1, s2


def stats_from_sums(s1: np.ndarray, s2: np.ndarray, n_patches: int, pixels_per_patch: int) -> dict:
    """Mean and population std per channel on the 0..1 scale, in exact integer arithmetic until the final division."""
    if n_patches == 0:
        raise HcdError("stats: no training rows to compute statistics from")
    n = n_patches * pixels_per_patch
    mean = [int(a) / n for a in s1]
    var = [(int(b) * n - int(a) * int(a)) / (n * n) for a, b in zip(s1, s2)]
    return {
        "mean": [m / 255.0 for m in mean],
        "std": [float(np.sqrt(v)) / 255.0 for v in var],
        "mean_255": mean,
        "std_255": [float(np.sqrt(v)) for v in var],
        "n_patches": int(n_patches),
        "n_pixels": int(n),
    }


def channel_stats(x: np.ndarray, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Mean and population std per channel of ``x[rows]`` (uint8 N x H x W x 3), on the 0..1 scale."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    s1, s2 = channel_sums(x, rows, chunk_rows) if len(rows) else (np.zeros(3, np.uint64), np.zeros(3, np.uint64))
    return stats_from_sums(s1, s2, len(rows), int(np.prod(x.shape[1:3])))


def stats_per_held_out(x: np.ndarray, rows: np.ndarray, held: list[np.ndarray], chunk_rows: int = CHUNK_ROWS) -> list[dict]:
    """``channel_stats`` of ``rows[~h]`` for each mask ``h`` of ``held`` (one per fold), in one pass over the array.

    Rows held out by the same masks (with K folds, one fold's rows) are summed once; each fold's
    training side adds the sums of the groups it keeps. The sums are exact integers, so each fold's
    result equals its own pass (67 s per fold on Kaggle's array before: 319 s for five)."""
    pattern = np.zeros(len(rows), dtype=np.int64)
    for k, h in enumerate(held):
        pattern |= h.astype(np.int64) << k
    kept_by = {int(p): [not (p >> k) & 1 for k in range(len(held))] for p in np.unique(pattern)}
    sums = {}
    for p, kept in kept_by.items():
        if any(kept):  # rows every fold holds out are never read
            group = np.sort(rows[pattern == p].astype(np.int64))
            sums[p] = (*channel_sums(x, group, chunk_rows), len(group))
    pixels = int(np.prod(x.shape[1:3]))
    out = []
    for k in range(len(held)):
        parts = [sums[p] for p, kept in kept_by.items() if kept[k]]
        s1 = sum((a for a, _, _ in parts), np.zeros(3, np.uint64))
        s2 = sum((b for _, b, _ in parts), np.zeros(3, np.uint64))
        out.append(stats_from_sums(s1, s2, sum(n for _, _, n in parts), pixels))
    return out


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
    per_fold = stats_per_held_out(x, index["row"].to_numpy()[inlier], [held[inlier] for held in held_out(sides, args.split)])
    stats = per_fold[0] if "fold" not in sides.columns else {"folds": per_fold}
    write_json(Path(args.out), stats)
    for i, st in enumerate(per_fold):
        where = f" (fold {i})" if len(per_fold) > 1 else ""
        print(f"stats{where}: {st['n_patches']} patches, mean {[round(v, 4) for v in st['mean']]}, std {[round(v, 4) for v in st['std']]}", file=sys.stderr)
