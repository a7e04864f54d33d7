"""Read a Kaggle-layout dataset straight from its zip archive or an extracted folder.

Layout (the competition archive ``histopathologic-cancer-detection.zip``)::

    train_labels.csv        id,label
    sample_submission.csv   id,label
    train/<40-hex id>.tif
    test/<40-hex id>.tif

A single enclosing top folder (``histopathologic-cancer-detection/train/...``) is
accepted too. Nothing is extracted: members are read into memory one at a time,
so member names (``../``, absolute paths, symlinks) can never write anywhere.

For speed a zip member is read with ``os.pread`` at the offsets of zipfile's own
central-directory parse (no file object per member, no mmap inflating the
resident memory), inflated with ISA-L (``isal``, falls back to zlib) and
CRC-checked; members in other compression methods go through :mod:`zipfile`.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from hcd.data.tiff import PatchError
from hcd.errors import HcdError

try:  # ISA-L: ~1.7x faster inflate, ~5x faster crc32 than zlib on these members
    from isal import isal_zlib as _z
except ImportError:  # pragma: no cover - isal is a declared dependency
    _z = zlib  # type: ignore[assignment]

ID_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_MEMBER_BYTES = 8 * 1024 * 1024  # a 96x96 patch is ~28 KB; larger is refused unread (zip bomb)
MAX_META_BYTES = 64 * 1024 * 1024  # Kaggle's train_labels.csv is 9.5 MB; a larger table is refused (memory bomb)
_LOCAL = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
# what zipfile raises on a damaged member: bad headers, names that are not UTF-8, unsupported or encrypted entries
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, UnicodeDecodeError, NotImplementedError, RuntimeError, ValueError)

# A member reference travels to worker processes: plain tuples, no ZipInfo.
# zip:  (name, header_offset, compress_size, file_size, compress_type, crc, flag_bits, extra_len_guess)
# dir:  (relative path,)
Ref = tuple


@dataclass(frozen=True)
class Listing:
    """What a source holds: patch ids -> member refs, plus odd members."""

    train: dict[str, Ref]
    test: dict[str, Ref]
    odd: list[tuple[str, str, str]]  # (split, member name, reason) for misnamed files


_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def unsafe_name(name: str) -> bool:
    """A member name that would escape the folder if extracted: absolute, a drive, or a ``..`` part."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(_DRIVE_RE.match(name)) or ".." in parts


def _classify(names: list[str], label: str, links: frozenset[str] = frozenset()) -> tuple[str, dict[str, int], dict[str, int], list[tuple[str, str, str]]]:
    """Find the dataset root inside ``names`` and index the patch members by id.

    Members with unsafe names (zip-slip: ``../``, absolute paths) and symbolic
    links are reported and never read; nothing is ever extracted anyway.
    """
    roots = [n[: -len("train_labels.csv")] for n in names if n.endswith("train_labels.csv") and n.count("/") <= 1]
    roots = [r for r in roots if r == "" or r.endswith("/")]
    if not roots:
        raise HcdError(f"{label}: no train_labels.csv at the top level (is this the Kaggle histopathologic-cancer-detection archive?)")
    root = "" if "" in roots else sorted(roots)[0]
    train: dict[str, int] = {}
    test: dict[str, int] = {}
    odd: list[tuple[str, str, str]] = []
    for pos, name in enumerate(names):
        if unsafe_name(name) or name in links:
            where = next((s for s in ("train", "test") if name.startswith(f"{root}{s}/")), "archive")
            odd.append((where, name, "symbolic link: not followed, not read" if name in links else "unsafe name (absolute or '..'): not read, nothing extracted"))
            continue
        if not name.startswith(root):
            continue
        rel = name[len(root) :]
        for split, table in (("train", train), ("test", test)):
            prefix = split + "/"
            if rel.startswith(prefix) and len(rel) > len(prefix):
                base = rel[len(prefix) :]
                if base.endswith("/"):
                    continue  # directory entry
                stem, dot, ext = base.rpartition(".")
                if "/" in base or not dot or ext.lower() not in ("tif", "tiff") or not ID_RE.match(stem):
                    odd.append((split, name, "not named <40-hex id>.tif"))
                elif stem in table:
                    odd.append((split, name, "same id as another member"))
                else:
                    table[stem] = pos
    return root, train, test, odd


class ZipSource:
    """A Kaggle-layout zip archive."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        try:
            self._zf: zipfile.ZipFile | None = zipfile.ZipFile(self.path)  # one central-directory parse
            self._infos = self._zf.infolist()
        except FileNotFoundError:
            raise HcdError(f"{self.label}: archive not found") from None
        except ZIP_ERRORS as exc:
            raise HcdError(f"{self.label}: not a readable zip archive ({exc})") from None
        names = [i.filename for i in self._infos]
        links = frozenset(i.filename for i in self._infos if i.create_system == 3 and (i.external_attr >> 16) & 0o170000 == 0o120000)
        self.root, train, test, self._odd = _classify(names, self.label, links)
        self._by_name = {i.filename: i for i in self._infos}
        self._train = {k: self._ref(self._infos[v]) for k, v in train.items()}
        self._test = {k: self._ref(self._infos[v]) for k, v in test.items()}
        self._fd: int | None = None

    @staticmethod
    def _ref(info: zipfile.ZipInfo) -> Ref:
        # len(info.extra) guesses the local header's extra field, so one pread usually gets header and data
        return (info.filename, info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC, info.flag_bits, len(info.extra))

    def listing(self) -> Listing:
        return Listing(self._train, self._test, list(self._odd))

    def read_meta(self, name: str) -> bytes | None:
        """A top-level file such as ``train_labels.csv``; None when absent."""
        info = self._by_name.get(self.root + name)
        if info is None:
            return None
        if info.file_size > MAX_META_BYTES:
            raise HcdError(f"{self.label}: {name} declares {info.file_size:,} bytes, larger than the {MAX_META_BYTES // 2**20} MiB a Kaggle table can be; refused")
        try:
            zf = self._zf or zipfile.ZipFile(self.path)
            with zf.open(info) as fh:  # read at most the limit: a member that lies about its size is cut off
                data = fh.read(MAX_META_BYTES + 1)
            if len(data) > MAX_META_BYTES:
                raise HcdError(f"{self.label}: {name} inflates past {MAX_META_BYTES // 2**20} MiB; refused")
            return data
        except ZIP_ERRORS as exc:
            raise HcdError(f"{self.label}: {name} cannot be read ({type(exc).__name__}: {str(exc)[:100]})") from None

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, ref: Ref) -> bytes:
        """Bytes of one member, or :class:`PatchError` (never more than MAX_MEMBER_BYTES)."""
        name, offset, csize, size, method, crc, flags, extra_guess = ref
        if size > MAX_MEMBER_BYTES or csize > MAX_MEMBER_BYTES:
            raise PatchError("undecodable", f"zip member declares {max(size, csize):,} bytes, refused unread")
        if flags & 0x1:
            raise PatchError("undecodable", "zip member is encrypted")
        fd = self._handle()
        guess = _LOCAL.size + len(name.encode()) + extra_guess
        buf = os.pread(fd, guess + csize, offset)  # header and data in one read, when the guess holds
        if len(buf) < _LOCAL.size:
            raise PatchError("undecodable", "zip member header lies past the end of the archive")
        sig, _, _, _, _, _, _, _, _, nlen, elen = _LOCAL.unpack_from(buf)
        if sig != b"PK\x03\x04":
            raise PatchError("undecodable", "corrupt zip member (bad local header)")
        start = _LOCAL.size + nlen + elen
        raw = buf[start : start + csize] if start == guess else os.pread(fd, csize, offset + start)
        if len(raw) != csize:
            raise PatchError("undecodable", "zip member truncated (archive ends early)")
        if method == zipfile.ZIP_STORED:
            data = raw
        elif method == zipfile.ZIP_DEFLATED:
            try:
                d = _z.decompressobj(-15)
                data = d.decompress(raw, MAX_MEMBER_BYTES + 1)
            except (zlib.error, getattr(_z, "error", zlib.error)) as exc:
                raise PatchError("undecodable", f"corrupt zip member ({exc})") from None
            if len(data) > MAX_MEMBER_BYTES:
                raise PatchError("undecodable", "zip member inflates past the size limit, refused")
        else:
            try:
                with zipfile.ZipFile(self.path) as zf, zf.open(name) as fh:
                    data = fh.read(MAX_MEMBER_BYTES + 1)
            except ZIP_ERRORS as exc:
                raise PatchError("undecodable", f"zip member cannot be read ({exc})") from None
            return data
        if len(data) != size or _z.crc32(data) != crc:
            raise PatchError("undecodable", "zip member fails its CRC check (corrupt archive)")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def __getstate__(self) -> dict:  # workers open their own descriptor
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_zf"] = None
        state["_infos"] = []
        state["_by_name"] = {}
        return state


class DirSource:
    """An extracted Kaggle-layout folder.

    Only regular files are read, never through a link: a symbolic link anywhere
    inside the folder (a labels file pointing at someone's credentials, a
    ``train/`` that is a link elsewhere) stops the scan with one line naming it,
    and a FIFO, socket or device named ``<id>.tif`` is flagged, never opened (a
    FIFO would block the scan forever).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        if not self.path.is_dir():
            raise HcdError(f"{self.label}: folder not found")
        names: list[str] = [f for f in ("train_labels.csv", "sample_submission.csv") if _lexists(self.path / f)]
        if not names:
            subs = [p for p in self.path.iterdir() if _real_dir(p) and _lexists(p / "train_labels.csv")]
            if len(subs) == 1:
                self.path = subs[0]
                names = [f for f in ("train_labels.csv", "sample_submission.csv") if _lexists(self.path / f)]
        for name in names:
            _refuse_link(self.path / name)
        for split in ("train", "test"):
            d = self.path / split
            if _lexists(d):
                _refuse_link(d)
            if _real_dir(d):
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_symlink():
                            _refuse_link(Path(e.path))
                        if not e.is_dir(follow_symlinks=False):
                            names.append(f"{split}/{e.name}")
        self.root, train, test, self._odd = _classify(names, self.label)
        self._train = {k: (names[v],) for k, v in train.items()}
        self._test = {k: (names[v],) for k, v in test.items()}

    def listing(self) -> Listing:
        return Listing(self._train, self._test, list(self._odd))

    def read_meta(self, name: str) -> bytes | None:
        p = self.path / name
        if not _lexists(p):
            return None
        _refuse_link(p)
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise HcdError(f"{p}: not a regular file")
        if st.st_size > MAX_META_BYTES:
            raise HcdError(f"{p}: {st.st_size:,} bytes, larger than the {MAX_META_BYTES // 2**20} MiB a Kaggle table can be; refused")
        return p.read_bytes()

    def read(self, ref: Ref) -> bytes:
        p = self.path / ref[0]
        try:
            st = p.lstat()
        except OSError as exc:
            raise PatchError("undecodable", f"cannot be read ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise PatchError("undecodable", "symbolic link, not read")
        if not stat.S_ISREG(st.st_mode):
            raise PatchError("undecodable", "not a regular file (FIFO, socket or device), not read")
        if st.st_size > MAX_MEMBER_BYTES:
            raise PatchError("undecodable", f"file is {st.st_size:,} bytes, refused unread")
        try:  # O_NOFOLLOW | O_NONBLOCK: a file swapped for a link or a FIFO since the lstat still cannot block or escape
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise PatchError("undecodable", f"cannot be read ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PatchError("undecodable", "not a regular file, not read")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read(MAX_MEMBER_BYTES + 1)
        except OSError as exc:
            raise PatchError("undecodable", f"cannot be read ({exc.strerror})") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _refuse_link(p: Path) -> None:
    if p.is_symlink():
        raise HcdError(f"{p}: a symbolic link; hcd reads no links in a folder source (copy the file itself in)")


def open_source(path: str | os.PathLike[str]) -> ZipSource | DirSource:
    """A zip archive or an extracted folder, whichever ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return DirSource(p)
    if not p.exists():
        raise HcdError(f"{p}: not found")
    return ZipSource(p)
