"""The demo dataset: deterministic, Kaggle layout, label rule in the centre only."""

from __future__ import annotations

import hashlib
import re
import zipfile

import pandas as pd
import pytest
from conftest import TINY

from hcd.data import synth
from hcd.data.synth import _all_slides, render, truth, write_archive
from hcd.pipeline.params import DemoParams


def test_archive_is_byte_identical_for_the_same_params(tiny_archive, tmp_path):
    again = tmp_path / "again.zip"
    write_archive(again, TINY)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(tiny_archive.read_bytes()).digest()


def test_kaggle_layout(tiny_archive):
    with zipfile.ZipFile(tiny_archive) as zf:
        names = zf.namelist()
        labels = pd.read_csv(zf.open("train_labels.csv"), dtype={"id": str})
        sub = pd.read_csv(zf.open("sample_submission.csv"), dtype={"id": str})
    assert list(labels.columns) == ["id", "label"] and list(sub.columns) == ["id", "label"]
    train = {n[6:-4] for n in names if n.startswith("train/")}
    test = {n[5:-4] for n in names if n.startswith("test/")}
    assert set(labels["id"]) == train and set(sub["id"]) == test
    assert len(train) == TINY.n_train and len(test) == TINY.n_test
    assert all(re.fullmatch(r"[0-9a-f]{40}", i) for i in train | test)
    assert set(names) == {"train_labels.csv", "sample_submission.csv"} | {f"train/{i}.tif" for i in train} | {f"test/{i}.tif" for i in test}


def test_positive_fraction_and_slides():
    t = truth(DemoParams(n_train=1000, n_test=200))
    assert t.train["label"].mean() == 0.4
    assert not set(t.train["slide"]) & set(t.test["slide"]), "test patches come from other slides"
    per_slide = t.train.groupby("slide")["label"].mean()
    assert per_slide.max() - per_slide.min() > 0.3, "positives cluster in tumour slides"


def test_label_depends_only_on_the_centre():
    """The label is whether a tumour nucleus reaches into the centre (render asserts it for every patch it
    draws); tumour off-centre is as common in negatives as in positives, so the ring gives nothing away; and
    the centre's border is where the hard cases are: single cells just inside it (positives) or just outside
    it (negatives)."""
    import numpy as np

    p = DemoParams(n_train=300, n_test=10)
    t, slides = truth(p), _all_slides(p)
    for i in range(120):  # the invariant holds on every patch drawn
        row = t.train.iloc[i]
        render(p.seed, "train", i, int(row["drawn"]), slides.loc[int(row["slide"])], int(row["twin"]))
    foci = {y: [[kind for kind, _, _ in synth._foci(np.random.default_rng([9, i]), y)] for i in range(600)] for y in (0, 1)}
    off = {y: np.mean(["off" in f for f in foci[y]]) for y in (0, 1)}
    assert abs(off[0] - off[1]) < 0.1 and 0.4 < off[0] < 0.6
    assert 0.4 < np.mean(["edge" in f for f in foci[1]]) < 0.6 and not any("edge" in f for f in foci[0])
    assert 0.25 < np.mean(["near" in f for f in foci[0]]) < 0.45 and not any("near" in f for f in foci[1])


def test_a_few_labels_are_disputed_and_the_positive_fraction_stays_exact():
    t = truth(DemoParams(n_train=2000, n_test=500))
    for side in (t.train, t.test):
        flipped = (side["label"] != side["drawn"]).mean()
        assert abs(flipped - synth.DISPUTED) < 0.005 and side["label"].sum() == side["drawn"].sum()


def test_parallel_rendering_writes_the_same_archive(tmp_path):
    p = DemoParams(n_train=300, n_test=40, n_slides=6, seed=5)
    write_archive(tmp_path / "one.zip", p, workers=1)
    write_archive(tmp_path / "two.zip", p, workers=2)
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()


def test_the_rendering_pool_ends_its_workers_without_a_signal(tmp_path, monkeypatch):
    """A finished pool is closed, not terminated: terminate() SIGTERMs the workers, and one still starting
    can lose that signal and hang the stage (hcd.data.synth.write_archive). A failed one is terminated."""
    import multiprocessing.pool

    calls = []
    real = multiprocessing.pool.Pool.terminate
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", lambda self: calls.append(self) or real(self))
    write_archive(tmp_path / "ok.zip", DemoParams(n_train=300, n_test=40, n_slides=6, seed=5), workers=2)
    assert calls == [], "the pool of a finished rendering was terminated (its workers SIGTERMed)"
    member = synth._member
    monkeypatch.setattr(synth, "_member", lambda name: member(name) if "/" not in name else 1 / 0)  # fails on the first rendered patch
    with pytest.raises(ZeroDivisionError):
        write_archive(tmp_path / "bad.zip", DemoParams(n_train=300, n_test=40, n_slides=6, seed=5), workers=2)
    assert len(calls) == 1 and not (tmp_path / "bad.zip").exists()
