"""Split stratification and grouping; channel statistics against numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hcd.errors import HcdError
from hcd.pipeline.params import SplitParams
from hcd.stages.split import balance, read_groups, split
from hcd.stages.stats import channel_stats, channel_sums, stats_per_held_out


def index(n=1000, pos=0.4, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos).astype(int)
    return pd.DataFrame({"row": np.arange(n), "id": [f"{i:040x}" for i in range(n)], "label": y})


@pytest.mark.parametrize("frac", [0.1, 0.25])
def test_stratified_split_keeps_class_balance(frac):
    idx = index()
    val = split(idx, SplitParams(val_fraction=frac, seed=1))
    assert abs(val.mean() - frac) < 0.002
    y = idx["label"].to_numpy()
    assert abs(y[val].mean() - y[~val].mean()) < 0.01
    np.testing.assert_array_equal(val, split(idx, SplitParams(val_fraction=frac, seed=1)))
    assert not np.array_equal(val, split(idx, SplitParams(val_fraction=frac, seed=2)))


def test_group_split_keeps_every_group_on_one_side():
    idx = index(2000)
    groups = np.random.default_rng(1).integers(0, 40, len(idx)).astype(str)
    val = split(idx, SplitParams(val_fraction=0.2, seed=0), groups)
    assert not set(groups[val]) & set(groups[~val])
    assert 0.1 < val.mean() < 0.3
    bal = balance(idx, val, groups)
    assert bal["groups_on_both_sides"] == 0 and bal["grouped"]
    assert bal["train"]["n"] + bal["val"]["n"] == len(idx)


def test_groups_file_must_cover_every_id(tmp_path):
    idx = index(10)
    f = tmp_path / "g.csv"
    f.write_text("id,group\n" + "".join(f"{i},s{k % 3}\n" for k, i in enumerate(idx["id"][:8])))
    with pytest.raises(HcdError, match="2 train ids have no group"):
        read_groups(f, idx["id"])
    f.write_text("slide,id\n")
    with pytest.raises(HcdError, match="expected header 'id,group'"):
        read_groups(f, idx["id"])


def test_channel_stats_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (300, 96, 96, 3), dtype=np.uint8)
    rows = np.random.default_rng(1).choice(300, 170, replace=False)
    got = channel_stats(x, rows, chunk_rows=16)
    ref = x[np.sort(rows)].reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(got["mean"], ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["std"], ref.std(axis=0), rtol=1e-10)
    assert got["n_patches"] == 170


def test_channel_sums_are_the_exact_integers_at_every_chunk_size():
    x = np.random.default_rng(2).integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    x[:5] = 255  # the largest squares, for the uint32 accumulators
    rows = np.arange(3, 70)
    wide = x[rows].reshape(-1, 3).astype(np.uint64)
    for chunk in (1, 7, 64, 66_051):
        s1, s2 = channel_sums(x, rows, chunk)
        assert s1.tolist() == wide.sum(0).tolist() and s2.tolist() == (wide * wide).sum(0).tolist()
    with pytest.raises(ValueError, match="overflow"):
        channel_sums(x, rows, 66_052)


@pytest.mark.parametrize("folds", [1, 3])
def test_one_pass_stats_per_fold_equal_a_pass_per_fold(folds):
    """The stage sums each fold's rows once and adds up each training side: the dicts must be equal to a
    separate channel_stats of every fold's training rows, to the last bit."""
    rng = np.random.default_rng(folds)
    x = rng.integers(0, 256, (90, 12, 12, 3), dtype=np.uint8)
    rows = rng.permutation(90)[:80]  # some rows (outliers) left out, the rest in shuffled order
    fold = rng.integers(0, folds, 80) if folds > 1 else None
    held = [fold == k for k in range(folds)] if folds > 1 else [rng.random(80) < 0.2]
    assert stats_per_held_out(x, rows, held, chunk_rows=16) == [channel_stats(x, rows[~h]) for h in held]


def test_stats_stage_excludes_validation_and_outliers(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    x = np.random.default_rng(0).integers(0, 256, (40, 96, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    idx = index(40).assign(outlier=0)
    idx.loc[[3, 4], "outlier"] = 1
    idx.to_csv(tmp_path / "index.csv", index=False)
    side = np.where(np.arange(40) % 5 == 0, "val", "train")
    idx[["row", "id", "label"]].assign(side=side).to_csv(tmp_path / "split.csv", index=False)
    subprocess.run([sys.executable, str(REPO / "workflow/scripts/stats.py"), "x.npy", "index.csv", "split.csv", "--out", "s.json"], cwd=tmp_path, check=True)
    import json

    got = json.loads((tmp_path / "s.json").read_text())
    use = (side == "train") & (idx["outlier"].to_numpy() == 0)
    ref = x[use].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(got["mean"], ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["std"], ref.std(axis=0), rtol=1e-10)
