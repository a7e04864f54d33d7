"""Small CSV tables — labels, submissions — with one-line errors.

One reader for ``train_labels.csv`` / ``sample_submission.csv`` inside a dataset
(the scan stage, :func:`read_csv_bytes`) and for every CSV file a user hands a command
(``hcd score``, ``hcd submit``: :func:`read_csv_file`): a plain file of bounded size, UTF-8
(a BOM tolerated), not empty, no line longer than :data:`MAX_LINE` characters
(a table is read whole only within that), a parsable CSV; column names
lower-cased and stripped, every value a string.
"""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import pandas as pd

from hcd.errors import HcdError, excerpt

MAX_LINE = 1024  # an id,label row is ~43 characters
_LONG_LINE = re.compile(r"[^\n]{%d}" % (MAX_LINE + 1))


def read_csv_bytes(data: bytes, where: str) -> pd.DataFrame:
    """``data`` as a DataFrame of strings; :class:`HcdError` starting with ``where`` otherwise."""
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError:
        raise HcdError(f"{where}: not UTF-8 text") from None
    if not text.strip():
        raise HcdError(f"{where}: empty file")
    long_line = _LONG_LINE.search(text)
    if long_line:
        raise HcdError(f"{where}: line {text.count(chr(10), 0, long_line.start()) + 1} is longer than {MAX_LINE} characters; not an id,label table")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise HcdError(f"{where}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


MAX_TABLE_BYTES = 256 * 2**20  # Kaggle's test set is 57,458 rows (~3 MB); far larger is not a submission


def read_csv_file(path: Path, max_bytes: int = MAX_TABLE_BYTES) -> pd.DataFrame:
    """A CSV file a user gave a command, as a DataFrame of strings; one line naming the file and what is wrong
    with it otherwise (missing, a folder, a FIFO, too large, a zip, not UTF-8, empty, not a table)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise HcdError(f"{path}: a folder, not a CSV file")
        if not stat.S_ISREG(st.st_mode):
            raise HcdError(f"{path}: not a regular file (a FIFO, socket or device); refused unread")
        if st.st_size > max_bytes:
            raise HcdError(f"{path}: {st.st_size:,} bytes, larger than a submission or labels file can be; refused")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise HcdError(f"{path}: not found") from None
    except OSError as exc:
        raise HcdError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    if data.startswith(b"PK\x03\x04"):
        raise HcdError(f"{path}: a zip archive, not a CSV (extract the CSV from it first)")
    frame = read_csv_bytes(data, str(path))
    if "id" not in frame.columns:
        raise HcdError(f"{path}: no 'id' column (found {excerpt(','.join(frame.columns))})")
    frame["id"] = frame["id"].str.strip()
    return frame
