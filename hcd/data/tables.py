"""Small CSV tables read from bytes — labels, submissions — with one-line errors.

One reader for ``train_labels.csv`` / ``sample_submission.csv`` inside a dataset
(the scan stage) and for submissions and labels given to ``hcd score``: UTF-8
(a BOM tolerated), not empty, no line longer than :data:`MAX_LINE` characters
(a table is read whole only within that), a parsable CSV; column names
lower-cased and stripped, every value a string.
"""

from __future__ import annotations

import io
import re

import pandas as pd

from hcd.errors import HcdError

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
