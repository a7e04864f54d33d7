"""Content changes that mtimes hide: a file rewritten in place with its old mtime put back.

Snakemake reruns a job when an input is newer than its outputs (and, with
``profiles/default``'s checksums, only when that newer input's content also differs
from what the job read). A pipeline file edited in place and given its old mtime back
(``touch -r``, ``cp -p``, ``rsync --times``, a tool that preserves timestamps) looks
unchanged, and every stage after it keeps results made from other data.

The inode's ctime cannot be set from user space: every write moves it. So before
Snakemake builds its DAG, :func:`reveal_hidden_edits` compares each pipeline file's
(ctime, size, inode) with what it recorded last time (``.hcd/contents.json``). Only for
the few files whose ctime moved does it hash the content; a file whose content changed
while its mtime stayed the recorded one gets its mtime set to now, so Snakemake sees an
updated input, finds its checksum changed, and reruns what follows. A file rewritten
with a new mtime (a stage's new output, ``dvc checkout``) is left to Snakemake, and a
ctime change with the same content (a copy, a relink) changes nothing.

The first run hashes every existing file once (the full Kaggle set's packed arrays: about
6 GB, some seconds); later runs hash only what was written since.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from hcd.digests import file_sha256

RECORD = Path(".hcd/contents.json")


def _load(record: Path) -> dict[str, list]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def reveal_hidden_edits(paths: Iterable[str], record: Path = RECORD) -> list[str]:
    """Set the mtime of each file whose content changed with its mtime kept to now; return those files.

    The record maps a path to [ctime_ns, size, inode, mtime_ns, sha256] as last seen.
    """
    old = _load(record)
    new: dict[str, list] = {}
    revealed = []
    for path in dict.fromkeys(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        seen = old.get(path)
        if not (isinstance(seen, list) and len(seen) == 5):
            seen = None  # first sight (or a damaged record): hash and record
        if seen and seen[:3] == [st.st_ctime_ns, st.st_size, st.st_ino]:
            new[path] = seen  # not written since: nothing to hash
            continue
        digest = file_sha256(path)
        if seen and digest != seen[4] and st.st_mtime_ns == seen[3]:
            os.utime(path)  # now: newer than what was made from it
            revealed.append(path)
            st = os.stat(path)
        new[path] = [st.st_ctime_ns, st.st_size, st.st_ino, st.st_mtime_ns, digest]
    if new != old:
        from hcd.atomic import write_json  # pandas: only when there is something to record

        write_json(record, new)
    return revealed


def pipeline_files(backbones: list[str]) -> list[str]:
    """What the checks above cover: every stage's outputs, and the hand-made files of data/groups/."""
    from hcd.pipeline.table import GROUPS_DIR, final_outputs

    return [*final_outputs(backbones), *sorted(str(p) for p in Path(GROUPS_DIR).rglob("*") if p.is_file())]
