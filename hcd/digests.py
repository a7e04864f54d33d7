"""Content and revision ids recorded with results.

- :func:`file_sha256`: a file's sha256, streamed (bundle files, pipeline files whose
  content hcd.pipeline.freshness watches).
- :func:`git_revision`: HEAD, for a Kaggle submission's message (what was submitted).
- :func:`git_blob_ids`: each source file's git blob id (what ``git hash-object`` prints),
  for the export manifest. Not a commit: results are committed *after* they are made
  (``dvc repro``, then ``git commit`` of ``dvc.lock``), so a manifest holding HEAD would
  name the commit before the one it is checked in with, and depend on something no
  engine tracks — a fresh clone's ``dvc repro`` would write another bundle than the
  committed one. Blob ids are content: the same in every clone, changed only with the
  files (which the export stage declares as dependencies), and ``git log
  --find-object=<id>`` names the commits that hold each one.

Standard library only: ``hcd submit`` and the Snakefile import it without torch.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

_BLOCK = 8 << 20  # bytes per read


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file, streamed through one reused 8 MiB buffer (packed arrays run to gigabytes)."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def git_revision(cwd: Path = Path(".")) -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_blob_ids(paths: list[str]) -> dict[str, str]:
    """``{path: git blob id}``: sha1 of ``blob <size>\\0<bytes>``, as git computes it (no git needed)."""
    ids = {}
    for path in paths:
        data = Path(path).read_bytes()
        ids[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return ids
