"""Packed patch arrays: one ``.npy`` file of N×96×96×3 uint8, memory-mappable.

Written by :class:`PackWriter` without ever holding the images in memory: rows
are written with ``pwrite`` at their slot (by several processes at once), then
the file is compacted in place to the usable rows, its header rewritten for the
final N and truncated — one decode per patch, one file, no second copy.
Readers use :func:`open_packed` (``np.load(..., mmap_mode="r")``); each array's
index (row, id, label...) is read by :func:`read_index`, and :func:`read_split`
checks a split against it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hcd import PATCH_SHAPE
from hcd.errors import HcdError

ROW_BYTES = int(np.prod(PATCH_SHAPE))
_HEADER_BYTES = 128  # fixed header size (numpy format 1.0, 64-byte aligned): room for any N


def _header(n: int) -> bytes:
    d = {"descr": "|u1", "fortran_order": False, "shape": (n, *PATCH_SHAPE)}
    body = repr(d).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:  # pragma: no cover - only for absurd N
        raise ValueError("header too long")
    return b"\x93NUMPY\x01\x00" + (_HEADER_BYTES - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class PackWriter:
    """Create ``path`` with room for ``capacity`` rows; workers fill slots; :meth:`finish` compacts."""

    def __init__(self, path: str | os.PathLike[str], capacity: int) -> None:
        self.path = Path(path)
        self.capacity = capacity
        size = _HEADER_BYTES + capacity * ROW_BYTES
        with open(self.path, "wb") as fh:
            fh.write(_header(capacity))
            try:  # reserve the blocks at once: writes then never wait on block allocation
                os.posix_fallocate(fh.fileno(), 0, size)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise HcdError(f"{self.path.parent}: not enough disk space for {size / 1e9:.2f} GB of packed patches") from None
                fh.truncate(size)  # filesystems without fallocate: a sparse file

    @staticmethod
    def write_rows(fd: int, first_slot: int, rows: list[np.ndarray]) -> None:
        """Write consecutive 96x96x3 uint8 rows from ``first_slot`` on (any process holding an fd).

        ``pwritev`` straight from the row buffers: joining them first costs ~10x more
        (page faults on a fresh 50 MB buffer) than the write itself.
        """
        if any(r.shape != PATCH_SHAPE or r.dtype != np.uint8 or not r.flags.c_contiguous for r in rows):
            raise ValueError("rows must be C-contiguous 96x96x3 uint8")
        off = _HEADER_BYTES + first_slot * ROW_BYTES
        for k in range(0, len(rows), 512):  # stay under IOV_MAX
            batch = rows[k : k + 512]
            want = len(batch) * ROW_BYTES
            done = os.pwritev(fd, batch, off)
            while done < want:  # short write: finish the rest row by row
                row, within = divmod(done, ROW_BYTES)
                done += os.pwrite(fd, memoryview(batch[row]).cast("B")[within:], off + done)
            off += want

    def finish(self, keep: np.ndarray, chunk_rows: int = 2048) -> int:
        """Keep only rows where ``keep`` is True (order preserved); return the final N."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.capacity,):
            raise ValueError("keep mask must have one entry per slot")
        src = np.flatnonzero(keep)
        fd = os.open(self.path, os.O_RDWR)
        try:
            dst = 0
            for start in range(0, len(src), chunk_rows):
                rows = src[start : start + chunk_rows]
                # runs of consecutive source rows move as one block; dst <= src always
                breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                for run in np.split(rows, breaks):
                    if run[0] != dst:
                        nbytes = len(run) * ROW_BYTES
                        buf = os.pread(fd, nbytes, _HEADER_BYTES + int(run[0]) * ROW_BYTES)
                        if len(buf) != nbytes:  # pragma: no cover
                            raise OSError("short read while compacting")
                        mv, off = memoryview(buf), _HEADER_BYTES + dst * ROW_BYTES
                        while mv:
                            n = os.pwrite(fd, mv, off)
                            mv, off = mv[n:], off + n
                    dst += len(run)
            os.pwrite(fd, _header(dst), 0)
            os.ftruncate(fd, _HEADER_BYTES + dst * ROW_BYTES)
        finally:
            os.close(fd)
        return dst


def read_row(path: str | os.PathLike[str], row: int) -> bytes:
    """The raw bytes of one row (for exact comparisons without mapping the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, ROW_BYTES, _HEADER_BYTES + row * ROW_BYTES)
    finally:
        os.close(fd)


def open_packed(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a packed array read-only (no pixels are read until indexed)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run the scan stage first)") from None
    except (ValueError, OSError) as exc:
        raise HcdError(f"{path}: not a packed patch array ({exc})") from None
    if arr.dtype != np.uint8 or arr.shape[1:] != PATCH_SHAPE:
        raise HcdError(f"{path}: expected N x 96 x 96 x 3 uint8, found {arr.shape} {arr.dtype}")
    return arr


def read_index(path: str | Path, columns: tuple[str, ...] = ("row", "id", "label")) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run the scan stage first)") from None
    missing = set(columns) - set(frame.columns)
    if missing:
        raise HcdError(f"{path}: missing columns {sorted(missing)}")
    return frame


def read_split(index: str | Path, split: str | Path, n_rows: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The packed index and the split, checked to list the same ids in the same order — the one check
    train, predict and stats share. ``n_rows``: the packed array's length, which the index must match."""
    idx = read_index(index)
    if n_rows is not None and len(idx) != n_rows:
        raise HcdError(f"{index}: {len(idx)} rows for {n_rows} packed patches (rerun scan)")
    try:
        sides = pd.read_csv(split, dtype={"id": str})
    except FileNotFoundError:
        raise HcdError(f"{split}: file not found (run the split stage first)") from None
    if "id" not in sides.columns or not ({"side", "fold"} & set(sides.columns)):
        raise HcdError(f"{split}: expected columns id and side (or fold), found {','.join(map(str, sides.columns))[:80]}")
    if len(sides) != len(idx):
        raise HcdError(f"{split}: {len(sides)} rows, but {index} has {len(idx)} (rerun split)")
    if not (sides["id"].to_numpy() == idx["id"].to_numpy()).all():
        raise HcdError(f"{split}: does not match {index}: other ids or order (rerun split)")
    return idx, sides


def held_out(sides: pd.DataFrame, where: str | Path = "split.csv") -> list[np.ndarray]:
    """One mask per fold, True for the patches that fold holds out: with one split, the validation side;
    with ``split.folds: K``, the rows whose ``fold`` is k. Training of fold k uses the rest."""
    if "fold" not in sides.columns:
        return [(sides["side"] == "val").to_numpy()]
    fold = pd.to_numeric(sides["fold"], errors="coerce").to_numpy()
    k = int(np.nanmax(fold)) + 1 if len(fold) else 0
    if np.isnan(fold).any() or k < 2 or set(np.unique(fold).astype(int)) != set(range(k)):
        raise HcdError(f"{where}: the fold column must number the folds 0..K-1 (K >= 2), every fold used (rerun split)")
    return [fold == i for i in range(k)]
