"""Atomic output writing.

Every file a stage produces is written to a temporary name in the same folder
and renamed into place only when complete, so a killed stage never leaves a file
that DVC or Snakemake would take as finished. Output folders (plots, dvclive
curves) are built the same way in a temporary folder and swapped in whole
(:meth:`Commit.dir`), so a failed run leaves the previous folder as it was. The
temporary names start with ``.`` and carry ``.tmp-``; :func:`clean_stale_temps`
removes ones left by a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from hcd.errors import HcdError

TMP_MARK = ".tmp-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?:old-)?(?P<pid>\d+)-[0-9a-f]{8}$")
OUTPUT_ROOTS = ("data", "models", "predictions", "results", "metrics", "plots", "dvclive")  # where stages write


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
        raise HcdError(f"{dest}: could not write ({exc.strerror or type(exc).__name__}); previous file left as it was") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_name(dest: Path, tag: str = "") -> Path:
    return dest.with_name(f".{dest.name}{TMP_MARK}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def clean_stale_temps(*dests: str | os.PathLike[str]) -> None:
    """Remove temporaries (files or folders) a killed earlier run left beside these outputs."""
    for dest in map(Path, dests):
        if dest.parent.is_dir():
            for stale in dest.parent.glob(f".{dest.name}{TMP_MARK}*"):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def public_name(path: str | os.PathLike[str]) -> str:
    """The output a temporary stands for (``data/packed/.train_x.npy.tmp-12-ab12cd34`` -> ``data/packed/train_x.npy``)."""
    p = Path(path)
    m = _TMP_RE.match(p.name)
    return str(p.with_name(m.group("name"))) if m else str(path)


def sweep_dead_temps(root: str | os.PathLike[str] = ".") -> list[Path]:
    """Remove temporaries under the output folders whose writing process is gone.

    A stage killed by a signal it cannot catch (SIGKILL, power loss) leaves its
    temporaries; its own next run removes them, but an engine may never rerun it
    (DVC restores the outputs from its cache instead). So every stage start sweeps
    temporaries of dead processes from every output folder, and from the commit
    journal's folder (a kill while a journal was being written). A live process's
    temporaries (a training running beside this one) are left alone.
    """
    removed = []
    for top in (*OUTPUT_ROOTS, JOURNAL_DIR):
        base = Path(root) / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [*filenames, *dirnames]:
                m = _TMP_RE.match(name)
                if m and not _alive(int(m.group("pid"))):
                    stale = Path(dirpath) / name
                    if stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
                    removed.append(stale)
            dirnames[:] = [d for d in dirnames if not _TMP_RE.match(d)]
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


JOURNAL_DIR = ".hcd/journal"  # pending renames of a Commit, replayed by the next stage start
JOURNAL_VERSION = 2  # 2: paths relative to the checkout, and its identity


class Commit:
    """A stage's outputs, renamed into place together once every one is written.

    ``with Commit() as c: tmp = c.path(out_a); ...; c.json(out_b, obj)`` — each
    output goes to its temporary name; only when the block ends without an
    error are they all renamed onto their destinations (renames need no disk
    space). A failure anywhere — disk full, a bad value, a kill — leaves every
    previous output as it was, not a mix of old and new.

    The renames themselves take a moment, and a ``kill -9`` among them would
    leave new and old outputs mixed. So before the first rename the list of
    renames goes to a journal (``.hcd/journal/<pid>-<random>.json``, written
    atomically), and it is deleted after the last. The next stage start — any
    stage, under either engine — replays a journal left by a dead process
    (:func:`replay_journals`), so the set always ends all new. The engines never
    take the mix as finished meanwhile: DVC records a stage in ``dvc.lock`` only
    after its command exits 0, and Snakemake keeps a killed job's outputs marked
    incomplete and reruns it.

    A journal names its renames relative to the checkout it belongs to, and that
    checkout by identity (device and inode of its folder), so a replay can only ever
    rename a commit's own temporary (``.<name>.tmp-<pid>-<hex>``) onto ``<name>`` in
    the same folder, inside the same checkout: a stale or planted journal cannot
    touch a file outside it, and a checkout copied with ``cp -a`` while a journal
    was pending does not rewrite the original's outputs (the copy drops the journal).
    Outputs outside the checkout (a library call writing to a temporary folder)
    are renamed without a journal.
    """

    def __init__(self, journal_dir: str | os.PathLike[str] = JOURNAL_DIR) -> None:
        self._items: list[tuple[Path, Path, bool]] = []  # (temporary, destination, is a folder)
        self._journal_dir = Path(journal_dir)
        self._root = _checkout_of(self._journal_dir)

    def __enter__(self) -> Commit:
        return self

    def path(self, dest: str | os.PathLike[str]) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(dest)
        self._items.append((tmp, dest, False))
        return tmp

    def dir(self, dest: str | os.PathLike[str]) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(dest)
        tmp.mkdir()
        self._items.append((tmp, dest, True))
        return tmp

    def json(self, dest: str | os.PathLike[str], obj: Any) -> None:
        _write_json(self.path(dest), obj)

    def csv(self, dest: str | os.PathLike[str], frame: pd.DataFrame) -> None:
        _write_csv(self.path(dest), frame)

    def _discard(self) -> None:
        for tmp, _, is_dir in self._items:
            if is_dir:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def _blame(self, exc: OSError) -> tuple[Path, bool]:
        """The output an OSError belongs to: the one whose temporary it names, else the last one begun."""
        name = Path(exc.filename) if getattr(exc, "filename", None) else None
        for tmp, dest, is_dir in reversed(self._items):
            if name is not None and (name == tmp or tmp in name.parents):
                return dest, is_dir
        return (self._items[-1][1], self._items[-1][2]) if self._items else (Path("."), False)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OSError):
                dest, is_dir = self._blame(exc)
                raise HcdError(f"{dest}: could not write ({exc.strerror or type(exc).__name__}); previous {'folder' if is_dir else 'file'} left as it was") from exc
            return None
        try:
            for tmp, dest, is_dir in self._items:
                if not tmp.exists():
                    raise HcdError(f"{dest}: nothing was written")
                for f in (tmp.rglob("*") if is_dir else [tmp]):
                    if f.is_file():
                        with open(f, "rb+") as fh:
                            os.fsync(fh.fileno())
            journal = self._write_journal() if len(self._items) > 1 else None
        except OSError as err:
            self._discard()
            dest, is_dir = self._blame(err)
            raise HcdError(f"{dest}: could not write ({err.strerror or type(err).__name__}); previous {'folder' if is_dir else 'file'} left as it was") from err
        except BaseException:
            self._discard()
            raise
        _apply(self._items)
        if journal is not None:
            journal.unlink(missing_ok=True)
        return None

    def _write_journal(self) -> Path | None:
        root = self._root.resolve()
        entries = []
        for t, d, is_dir in self._items:
            dest = d.parent.resolve() / d.name
            if not dest.is_relative_to(root):
                return None  # outputs outside the checkout: renamed without a journal (see the class doc)
            entries.append({"tmp": str((dest.parent / t.name).relative_to(root)), "dest": str(dest.relative_to(root)), "dir": is_dir})
        self._journal_dir.mkdir(parents=True, exist_ok=True)
        path = self._journal_dir / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        with atomic_path(path) as tmp:
            _write_json(tmp, {"version": JOURNAL_VERSION, "pid": os.getpid(), "checkout": _identity(root), "renames": entries})
        return path


def _apply(items: list[tuple[Path, Path, bool]]) -> None:
    """Rename each temporary onto its destination; one already renamed (its temporary gone) is skipped."""
    for tmp, dest, is_dir in items:
        if not os.path.lexists(tmp):
            continue
        if is_dir:
            old = _temp_name(dest, "old-")
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    for parent in {d.parent for _, d, _ in items}:
        _fsync_dir(parent)


def _checkout_of(journal_dir: Path) -> Path:
    """The checkout a journal folder belongs to: ``<checkout>/.hcd/journal``."""
    return journal_dir.parent.parent if journal_dir.name == "journal" and journal_dir.parent.name == ".hcd" else journal_dir.parent


def _identity(root: Path) -> dict[str, int]:
    st = os.stat(root)
    return {"dev": st.st_dev, "ino": st.st_ino}


def _entry(root: Path, e: Any) -> tuple[Path, Path, bool]:
    """One journalled rename, checked: both paths inside ``root``, the temporary one of the destination's, in
    its folder, which no link leads out of. ValueError otherwise."""
    if not isinstance(e, dict) or not isinstance(e.get("tmp"), str) or not isinstance(e.get("dest"), str) or not isinstance(e.get("dir"), bool):
        raise ValueError("malformed entry")
    tmp, dest = Path(e["tmp"]), Path(e["dest"])
    for rel in (tmp, dest):
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError("a path outside the checkout")
    m = _TMP_RE.match(tmp.name)
    if tmp.parent != dest.parent or not m or m.group("name") != dest.name:
        raise ValueError("not a temporary of its destination")
    folder = (root / dest.parent).resolve()
    if not folder.is_relative_to(root.resolve()):
        raise ValueError("a folder that leads out of the checkout")
    return root / tmp, root / dest, e["dir"]


def replay_journals(journal_dir: str | os.PathLike[str] = JOURNAL_DIR) -> list[Path]:
    """Finish the renames of commits whose process died among them (see :class:`Commit`). A journal of
    another checkout (this one is a copy) is dropped; one whose entries fail the checks is dropped unreplayed."""
    done: list[Path] = []
    base = Path(journal_dir)
    if not base.is_dir():
        return done
    root = _checkout_of(base)
    here = _identity(root)
    for journal in sorted(base.glob("*.json")):
        try:
            data = json.loads(journal.read_text())
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written right now (atomically): leave it
        if _alive(pid):
            continue  # that commit is still renaming
        try:
            if data.get("version") != JOURNAL_VERSION or data.get("checkout") != here:
                raise ValueError("another checkout's, or an older format")
            items = [_entry(root, e) for e in data["renames"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            journal.unlink(missing_ok=True)  # never replayed: its temporaries are swept as a dead process's
            continue
        _apply(items)
        journal.unlink(missing_ok=True)
        done.append(journal)
    return done


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
