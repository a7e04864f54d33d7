"""Shared fixtures: a tiny demo archive, and a builder for hand-made Kaggle-layout archives."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. The suite runs several pipelines and trainings at once on
# few cores; spinning threads then burn the cores the others wait for (four trainings at once on 2 cores:
# 77 s of CPU and 40 s of wall with the default policy, 40 s and 22 s passive; weights bit-identical).
# Before torch loads anywhere: libgomp reads it once, and every subprocess inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io
import secrets
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcd.data.synth import write_archive
from hcd.data.tiff import encode_patch
from hcd.pipeline.params import DemoParams, ScanParams
from hcd.stages.scan import ScanOutputs

REPO = Path(__file__).resolve().parents[1]
TINY = DemoParams(n_train=160, n_test=24, n_slides=12, seed=3)


def with_model_entries(raw: dict) -> dict:
    """``raw`` with an empty ``models`` entry for each listed backbone that has none: a params file holds
    one per backbone (hcd.pipeline.params.missing_model_entry)."""
    entries = {b: {} for b in raw.get("backbones", []) if isinstance(b, str)}
    return {**raw, "models": entries | dict(raw.get("models") or {})}


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "hcd.zip"
    write_archive(path, TINY)
    return path


def outputs(root: Path) -> ScanOutputs:
    return ScanOutputs(root / "scan/report.csv", root / "scan/summary.json", root / "packed/train_x.npy", root / "packed/train_index.csv", root / "packed/test_x.npy", root / "packed/test_index.csv")


def hexid(i: int) -> str:
    return f"{i:040x}"


def patch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, (96, 96, 3), dtype=np.uint8)


def tiff_bytes(img: np.ndarray, **kw) -> bytes:
    """A TIFF of ``img`` written by tifffile (any layout or compression it supports)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)
    return buf.getvalue()


def bomb_header() -> bytes:
    """A 1x1 TIFF whose header is rewritten to claim 100,000 x 100,000 px (a decompression bomb)."""
    data = bytearray(tiff_bytes(np.zeros((1, 1, 3), np.uint8), photometric="rgb"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for k in range(n):
        pos = ifd + 2 + 12 * k
        tag, _ = struct.unpack_from("<HH", data, pos)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, pos, tag, 4, 1, 100_000)
    return bytes(data)


def make_archive(path: Path, train: dict[str, bytes], labels: str | bytes, test: dict[str, bytes], sample: str | bytes | None = None, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """A zip in the Kaggle layout from explicit members (names are ids unless they contain '.')."""
    if sample is None:
        sample = "id,label\n" + "".join(f"{k},0\n" for k in test)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if "train_labels.csv" not in skip:
            zf.writestr("train_labels.csv", labels)
        if "sample_submission.csv" not in skip:
            zf.writestr("sample_submission.csv", sample)
        for split, members in (("train", train), ("test", test)):
            for name, data in members.items():
                zf.writestr(f"{split}/{name if '.' in name else name + '.tif'}", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def training_arrays(root: Path, n: int, learnable: bool = False) -> Path:
    """A packed array of ``n`` random patches (labels alternate), its index, a split (every third row
    validation: both classes on each side) and stats: the inputs of the train stage, made by hand."""
    import json

    import pandas as pd

    x = np.random.default_rng(0).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(int)
    if learnable:
        x[y == 1, 40:56, 40:56] = 60  # a dark centre
    np.save(root / "x.npy", x)
    ids = [f"{i:040x}" for i in range(n)]
    pd.DataFrame({"row": np.arange(n), "id": ids, "label": y, "outlier": 0}).to_csv(root / "index.csv", index=False)
    side = np.where(np.arange(n) % 3 == 0, "val", "train")
    pd.DataFrame({"row": np.arange(n), "id": ids, "label": y, "side": side}).to_csv(root / "split.csv", index=False)
    (root / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    return root


@pytest.fixture
def small_set():
    """Six good train patches (labels 0/1), three test patches."""
    train = {hexid(i): encode_patch(patch(i)) for i in range(6)}
    labels = "id,label\n" + "".join(f"{hexid(i)},{i % 2}\n" for i in range(6))
    test = {hexid(100 + i): encode_patch(patch(100 + i)) for i in range(3)}
    return train, labels, test


SCAN_DEFAULTS = ScanParams()


LONGEST = ("test_e2e.py", "test_e2e_interrupted.py", "test_e2e_folds.py")  # minutes each, on two cores


def pytest_collection_modifyitems(items):
    """The longest end-to-end files first, then three short files, then the other ``e2e`` files, then the rest.
    pytest-xdist (``--dist=loadfile``, pyproject.toml) hands each worker one file and then queues a second
    behind it: the long files start at once, each on a worker of its own, the files queued behind them are
    short ones, and the other end-to-end files go to whichever worker is free first instead of waiting
    behind a long one."""
    files = list(dict.fromkeys(item.path.name for item in items))
    e2e = {item.path.name for item in items if item.get_closest_marker("e2e")} - set(LONGEST)
    rest = [f for f in files if f not in LONGEST and f not in e2e]
    order = [f for f in LONGEST if f in files] + rest[: len(LONGEST)] + [f for f in files if f in e2e] + rest[len(LONGEST) :]
    items.sort(key=lambda item: order.index(item.path.name))  # stable: each file's tests keep their order


def pytest_configure(config):
    """One fake Kaggle key for the whole session, in the environment the pytest-xdist workers inherit: a
    pipeline run by one worker is checked for the key by another (tests/test_e2e.py)."""
    os.environ.setdefault("HCD_TEST_KAGGLE_KEY", secrets.token_hex(16))


def pytest_xdist_auto_num_workers(config):
    """One worker more than the cores: the end-to-end files spend part of their time waiting (on SLURM's
    status checks, on a kill's event, on process starts) and the extra worker fills it."""
    return (os.cpu_count() or 1) + 1


BUNDLE_FIT = {"method": "stack", "backbones": ["cnn"], "weights": [1.3], "intercept": -0.2}  # the tiny bundle's stacker


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny cnn trained once on hand-made arrays and exported as a bundle (``export/``), TTA x2, the stacker
    :data:`BUNDLE_FIT`: shared by the bundle tests and the untrusted-bundle corpus."""
    import json

    from hcd.pipeline.params import Params
    from hcd.stages.export import export
    from hcd.stages.train import train

    root = training_arrays(tmp_path_factory.mktemp("bundle"), 64, learnable=True)
    p = Params.model_validate({"backbones": ["cnn"], "train": {"epochs": 1, "batch_size": 16, "crop": 48, "patience": 0}, "predict": {"tta": 2}})
    train("cnn", p, root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", root / "models/cnn", root / "live", log=lambda m: None)
    (root / "ensemble.json").write_text(json.dumps(BUNDLE_FIT))
    export(p, {"cnn": root / "models/cnn"}, root / "ensemble.json", root / "export", log=lambda m: None)
    return root
