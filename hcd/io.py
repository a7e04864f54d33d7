"""Atomic output writing.

Every file a stage produces is written to a temporary name in the same folder
and renamed into place only when complete, so a killed stage never leaves a file
that DVC or Snakemake would take as finished. Output folders (plots, dvclive
curves) are built the same way in a temporary folder and swapped in whole
(:func:`atomic_dir`), so a failed run leaves the previous folder as it was. The
temporary names start with ``.`` and carry ``.tmp-``; :func:`clean_stale_temps`
removes ones left by a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
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
    tmp = _temp_name(dest)
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


def _temp_name(dest: Path, tag: str = "") -> Path:
    return dest.with_name(f".{dest.name}{TMP_MARK}{tag}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; swap it in for ``dest`` on success.

    Files left in ``dest`` by an earlier run (a removed backbone's plot) do not
    survive the swap. On any exception the temporary folder is removed and
    ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = _temp_name(dest, "old-")
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old.exists():
                os.replace(old, dest)
            raise
        _fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HcdError(f"{dest}: could not write ({exc.strerror or exc}); previous folder left as it was") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temps(*dests: str | os.PathLike[str]) -> None:
    """Remove temporaries (files or folders) a killed earlier run left beside these outputs."""
    for dest in map(Path, dests):
        if dest.parent.is_dir():
            for stale in dest.parent.glob(f".{dest.name}{TMP_MARK}*"):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


class Commit:
    """A stage's outputs, renamed into place together once every one is written.

    ``with Commit() as c: tmp = c.path(out_a); ...; c.json(out_b, obj)`` — each
    output goes to its temporary name; only when the block ends without an
    error are they all renamed onto their destinations (renames need no disk
    space). A failure anywhere — disk full, a bad value, a kill — leaves every
    previous output as it was, not a mix of old and new.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Commit:
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def path(self, dest: str | os.PathLike[str]) -> Path:
        return self._stack.enter_context(atomic_path(dest))

    def dir(self, dest: str | os.PathLike[str]) -> Path:
        return self._stack.enter_context(atomic_dir(dest))

    def json(self, dest: str | os.PathLike[str], obj: Any) -> None:
        _write_json(self.path(dest), obj)

    def csv(self, dest: str | os.PathLike[str], frame: pd.DataFrame) -> None:
        _write_csv(self.path(dest), frame)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(path, index=False, lineterminator="\n")


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(dest) as tmp:
        _write_json(tmp, obj)


def write_csv(dest: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    with atomic_path(dest) as tmp:
        _write_csv(tmp, frame)


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as exc:
        raise HcdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
