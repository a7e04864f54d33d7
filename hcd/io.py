"""Atomic output writing.

Every file a stage produces is written to a temporary name in the same folder
and renamed into place only when complete, so a killed stage never leaves a file
that DVC or Snakemake would take as finished. The temporary names start with
``.`` and carry ``.tmp-``; :func:`clean_stale_temps` removes ones left by a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from hcd.errors import HcdError

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success.

    On any exception (including disk full) the temporary file is removed and
    ``dest`` — if it existed — is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not tmp.exists():
            raise HcdError(f"{dest}: nothing was written")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HcdError(f"{dest}: could not write ({exc.strerror or exc}); previous file left as it was") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clean_stale_temps(*dests: str | os.PathLike[str]) -> None:
    """Remove temporaries a killed earlier run left beside these outputs."""
    for dest in map(Path, dests):
        if dest.parent.is_dir():
            for stale in dest.parent.glob(f".{dest.name}{TMP_MARK}*"):
                stale.unlink(missing_ok=True)


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(dest: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as exc:
        raise HcdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
