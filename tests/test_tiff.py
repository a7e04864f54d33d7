"""The TIFF decoder: the fast path agrees with tifffile, and every bad patch gets a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from conftest import bomb_header, tiff_bytes

from hcd.data.tiff import PatchError, _fast_ifd, decode_patch, encode_patch

IMG = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "kw",
    [
        {"photometric": "rgb"},
        {"photometric": "rgb", "byteorder": ">"},
        {"photometric": "rgb", "rowsperstrip": 7},
        {"photometric": "rgb", "rowsperstrip": 1, "byteorder": ">"},
    ],
    ids=["baseline", "big-endian", "7-row strips", "1-row strips big-endian"],
)
def test_fast_path_matches_tifffile_on_uncompressed_variants(kw):
    data = tiff_bytes(IMG, **kw)
    bo = "<" if data[:2] == b"II" else ">"
    fast = _fast_ifd(data, bo)
    assert fast is not None, "baseline uncompressed RGB must take the fast path"
    np.testing.assert_array_equal(fast, tifffile.imread(io.BytesIO(data)))
    np.testing.assert_array_equal(decode_patch(data), IMG)


@pytest.mark.parametrize("compression", ["zlib", "adobe_deflate"])
def test_compressed_tiffs_decode_through_tifffile(compression):
    data = tiff_bytes(IMG, photometric="rgb", compression=compression)
    assert _fast_ifd(data, "<") is None
    np.testing.assert_array_equal(decode_patch(data), IMG)


def test_tiled_and_bigtiff_decode():
    np.testing.assert_array_equal(decode_patch(tiff_bytes(IMG, photometric="rgb", tile=(32, 32))), IMG)
    np.testing.assert_array_equal(decode_patch(tiff_bytes(IMG, photometric="rgb", bigtiff=True)), IMG)


def test_encode_is_kaggle_layout():
    data = encode_patch(IMG)
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        page = tf.pages.first
        assert page.compression == 1 and page.shape == (96, 96, 3) and page.photometric == 2
    assert len(data) < 28000  # Kaggle's files are 27,935 bytes


@pytest.mark.parametrize(
    "data, reason, words",
    [
        (b"", "undecodable", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "undecodable", "PNG"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, "undecodable", "JPEG"),
        (b"hello world", "undecodable", "not a TIFF"),
        (encode_patch(IMG)[:5000], "undecodable", "truncated"),
        (encode_patch(IMG)[:100], "undecodable", "corrupt"),
        (tiff_bytes(IMG[:, :95], photometric="rgb"), "wrong_format", "96x95x3"),
        (tiff_bytes(IMG[..., 0]), "wrong_format", "96x96 uint8"),
        (tiff_bytes(np.dstack([IMG, IMG[..., :1]]), photometric="rgb", extrasamples=[2]), "wrong_format", "96x96x4"),
        (tiff_bytes(IMG.astype(np.uint16) * 200, photometric="rgb"), "wrong_format", "uint16"),
    ],
    ids=["empty", "png", "jpeg", "text", "truncated", "header-only", "95x96", "grayscale", "rgba", "16-bit"],
)
def test_bad_patches_get_a_reason(data, reason, words):
    with pytest.raises(PatchError) as info:
        decode_patch(data)
    assert info.value.reason == reason
    assert words in info.value.detail


def test_decompression_bomb_is_refused_unread():
    with pytest.raises(PatchError) as info:
        decode_patch(bomb_header())
    assert info.value.reason == "wrong_format" and "refused unread" in info.value.detail
