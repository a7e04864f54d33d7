"""Decode one patch from TIFF bytes, safely and fast.

Kaggle's patches are baseline TIFFs: uncompressed, 8-bit, 3-sample, chunky RGB.
For exactly that layout :func:`decode_patch` reads the first IFD with ``struct``
and views the pixels with ``np.frombuffer`` (~10 µs) — a plain
``tifffile.TiffFile`` costs ~100 µs of Python per patch, which would make the
scan slower than the disk. Anything else (compressed, tiled, big-endian oddities,
BigTIFF, other shapes) goes to tifffile, the reference reader; the test suite
checks both paths agree. The declared image size is checked *before* any pixel
is decoded, so a header claiming 100,000×100,000 px costs nothing.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import tifffile

from hcd import PATCH_SHAPE

PATCH_BYTES = PATCH_SHAPE[0] * PATCH_SHAPE[1] * PATCH_SHAPE[2]
MAX_DECODED_BYTES = 64 * PATCH_BYTES  # anything bigger is refused unread (decompression bomb)

_MAGIC = {b"II*\x00": "<", b"MM\x00*": ">"}
_BIGTIFF = (b"II+\x00", b"MM\x00+")
_SIGNATURES = (  # what a non-TIFF "patch" usually is, for a clearer message
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"PK\x03\x04", "zip"),
)
# TIFF field types -> (struct code, size)
_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}

# The baseline tags the fast path reads (TIFF 6.0 numbers).
WIDTH, HEIGHT, BITS, COMPRESSION, PHOTOMETRIC = 256, 257, 258, 259, 262
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTES, PLANAR = 273, 277, 278, 279, 284
EXTRA_SAMPLES, SAMPLE_FORMAT = 338, 339
_READ_TAGS = frozenset({WIDTH, HEIGHT, BITS, COMPRESSION, PHOTOMETRIC, STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTES, PLANAR, EXTRA_SAMPLES, SAMPLE_FORMAT})


def _is_kaggle_layout(tags: dict[int, tuple[int, ...]]) -> bool:
    """96x96, 3 samples of 8-bit unsigned integers, uncompressed, RGB, chunky, no extra (alpha) samples."""
    h, w, c = PATCH_SHAPE
    return (
        tags.get(WIDTH) == (w,)
        and tags.get(HEIGHT) == (h,)
        and tags.get(SAMPLES, (1,)) == (c,)
        and tags.get(BITS) in ((8, 8, 8), (8,))
        and tags.get(COMPRESSION, (1,)) == (1,)  # none
        and tags.get(PHOTOMETRIC) == (2,)  # RGB
        and tags.get(PLANAR, (1,)) == (1,)  # chunky: RGBRGB...
        and tags.get(SAMPLE_FORMAT, (1,)) in ((1,), (1, 1, 1))  # unsigned integer
        and EXTRA_SAMPLES not in tags
    )


# Layouts already parsed by _fast_ifd, by file length: (byte ranges the parser read, their
# bytes). Kaggle's files differ only in a DateTime string the parser never reads, so after
# the first file the check is three short comparisons instead of an IFD walk.
_LAYOUT_CACHE: dict[int, list[tuple[tuple[tuple[int, int], ...], tuple[bytes, ...], int]]] = {}


class PatchError(Exception):
    """A patch that cannot be used: ``reason`` is a scan-report reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _sniff(data: bytes) -> str:
    if not data:
        return "empty file (0 bytes)"
    for sig, kind in _SIGNATURES:
        if data.startswith(sig):
            return f"not a TIFF ({kind} data)"
    return "not a TIFF (no TIFF signature)"


def _fast_ifd(data: bytes, bo: str) -> np.ndarray | None:
    """Pixels of a baseline uncompressed 96x96 RGB TIFF, or None to use tifffile."""
    try:
        (ifd,) = struct.unpack_from(bo + "I", data, 4)
        (n,) = struct.unpack_from(bo + "H", data, ifd)
        ranges = [(0, 8), (ifd, ifd + 2 + 12 * n)]  # every byte range the parse depends on
        tags: dict[int, tuple[int, ...]] = {}
        for k in range(n):
            tag, typ, count, raw = struct.unpack_from(bo + "HHI4s", data, ifd + 2 + 12 * k)
            if tag not in _READ_TAGS:
                continue
            code, size = _TYPES.get(typ, (None, 0))
            if code is None or count > 1024:
                return None
            if count * size <= 4:
                tags[tag] = struct.unpack_from(bo + code * count, raw, 0)
            else:
                (off,) = struct.unpack(bo + "I", raw)
                tags[tag] = struct.unpack_from(bo + code * count, data, off)
                ranges.append((off, off + count * size))
    except struct.error:
        return None
    if not _is_kaggle_layout(tags):
        return None
    offsets, counts = tags.get(STRIP_OFFSETS, ()), tags.get(STRIP_BYTES, ())
    if not offsets or len(offsets) != len(counts) or sum(counts) != PATCH_BYTES:
        return None
    if any(o + k > len(data) for o, k in zip(offsets, counts)):
        raise PatchError("undecodable", f"truncated TIFF ({len(data)} bytes, pixel data runs past the end)")
    if len(offsets) == 1 or all(offsets[i] + counts[i] == offsets[i + 1] for i in range(len(offsets) - 1)):
        start = offsets[0]
        # A file of the same length with the same bytes in every range read parses identically.
        known = _LAYOUT_CACHE.setdefault(len(data), [])
        if len(known) < 4:
            known.append((tuple(ranges), tuple(bytes(data[a:b]) for a, b in ranges), start))
        return np.frombuffer(data, np.uint8, PATCH_BYTES, start).reshape(PATCH_SHAPE)
    flat = np.frombuffer(b"".join(data[o : o + k] for o, k in zip(offsets, counts)), np.uint8)
    return flat.reshape(PATCH_SHAPE)


def _tifffile_decode(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(io.BytesIO(data)) as tf:
                if not tf.pages:
                    raise PatchError("undecodable", "TIFF has no image")
                page = tf.pages.first
                shape, dtype = tuple(page.shape), np.dtype(page.dtype) if page.dtype is not None else None
                if dtype is None:
                    raise PatchError("undecodable", "TIFF sample format not supported")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if nbytes > MAX_DECODED_BYTES:
                    dims = "x".join(map(str, shape))
                    raise PatchError("wrong_format", f"declares {dims} {dtype} ({nbytes:,} bytes), refused unread")
                if shape != PATCH_SHAPE or dtype != np.uint8:
                    dims = "x".join(map(str, shape))
                    raise PatchError("wrong_format", f"{dims} {dtype}, expected 96x96x3 uint8")
                arr = page.asarray()
    except PatchError:
        raise
    except Exception as exc:  # tifffile raises many types on corrupt input
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PatchError("undecodable", f"corrupt TIFF ({msg})") from None
    if arr.shape != PATCH_SHAPE or arr.dtype != np.uint8:  # pragma: no cover - guarded above
        raise PatchError("wrong_format", f"decoded {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def decode_patch(data: bytes) -> np.ndarray:
    """Decode TIFF bytes to a read-only 96x96x3 uint8 array or raise :class:`PatchError`."""
    for ranges, values, start in _LAYOUT_CACHE.get(len(data), ()):
        if all(data[a:b] == v for (a, b), v in zip(ranges, values)):
            return np.frombuffer(data, np.uint8, PATCH_BYTES, start).reshape(PATCH_SHAPE)
    magic = bytes(data[:4])
    bo = _MAGIC.get(magic)
    if bo is None and magic not in _BIGTIFF:
        raise PatchError("undecodable", _sniff(bytes(data[:8])))
    if bo is not None:
        fast = _fast_ifd(data, bo)
        if fast is not None:
            return fast
    return _tifffile_decode(bytes(data))


def encode_patch(img: np.ndarray) -> bytes:
    """Uncompressed baseline RGB TIFF, the layout of Kaggle's own patches."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, photometric="rgb", compression=None, metadata=None)
    return buf.getvalue()
