"""Fuzzing (Hypothesis): hostile bytes give hcd's own clean errors, never a crash.

Bounded for CI (a few hundred inputs per target); run longer by hand with
``HCD_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
from conftest import hexid, patch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcd.data.source import ZipSource
from hcd.data.tiff import PatchError, decode_patch, encode_patch
from hcd.errors import HcdError
from hcd.stages.scan import parse_table

N = int(os.environ.get("HCD_FUZZ_EXAMPLES", 300))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VALID = encode_patch(patch(0))


@st.composite
def mutated(draw, base: bytes):
    """A valid file with a few bytes changed, a cut, or a splice."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


def check_patch(data: bytes) -> None:
    try:
        arr = decode_patch(data)
    except PatchError as err:
        assert err.reason in ("undecodable", "wrong_format") and err.detail
        return
    assert arr.shape == (96, 96, 3) and arr.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=2048))
def test_tiff_reader_random_bytes(data):
    check_patch(data)


@FUZZ
@given(mutated(VALID))
def test_tiff_reader_mutated_tiffs(data):
    check_patch(data)


@FUZZ
@given(mutated(b"II*\x00" + VALID[4:300]))
def test_tiff_reader_mutated_headers(data):
    check_patch(data)


LABELS = ("id,label\n" + "".join(f"{hexid(i)},{i % 2}\n" for i in range(5))).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(LABELS), st.text(max_size=300).map(str.encode)))
def test_labels_csv_parser(data):
    try:
        frame = parse_table(data, "train_labels.csv", "archive.zip")
    except HcdError as err:
        assert "train_labels.csv" in str(err) and "\n" not in str(err)
        return
    assert list(frame.columns) == ["id", "label"]


def small_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train_labels.csv", f"id,label\n{hexid(1)},0\n{hexid(2)},1\n")
        zf.writestr("sample_submission.csv", f"id,label\n{hexid(3)},0\n")
        for i, split in ((1, "train"), (2, "train"), (3, "test")):
            zf.writestr(f"{split}/{hexid(i)}.tif", encode_patch(patch(i)))
    return buf.getvalue()


ZIP = small_zip()


@FUZZ
@given(mutated(ZIP))
def test_archive_reader_mutated_zips(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("z") / "a.zip"
    path.write_bytes(data)
    try:
        src = ZipSource(path)
    except HcdError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    try:
        src.read_meta("train_labels.csv")
    except HcdError as err:
        assert str(path) in str(err)
    listing = src.listing()
    for ref in [*listing.train.values(), *listing.test.values()]:
        try:
            check_patch(src.read(ref))
        except PatchError as err:
            assert err.reason == "undecodable"
    src.close()
