"""Git revisions recorded with results.

- :func:`git_revision`: HEAD, for a Kaggle submission's message (what was submitted).
- :func:`code_revision`: the last commit that changed the code, for the export manifest.
  Not HEAD: a result is committed *after* it is made (``dvc repro``, then ``git commit``
  of ``dvc.lock``), so a manifest holding HEAD would name a commit older than the one it
  is checked in with, and a fresh clone's ``dvc repro`` (at the newer HEAD) would write
  another manifest than the committed one. The last commit touching :data:`CODE` is the
  same before and after that commit, so the bundle stays reproducible. With uncommitted
  changes to the code there is no commit that made it: None (the manifest says so).

Its own module so that ``hcd submit`` does not import the export stage (and with it
torch and timm) for one ``git rev-parse``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# What decides a result besides params.yaml (which the manifest records by value) and the data
CODE = ("hcd", "workflow", "Snakefile", "dvc.yaml", "pyproject.toml", "constraints.txt")


def _git(cwd: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_revision(cwd: Path = Path(".")) -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    return _git(cwd, "rev-parse", "HEAD")


def code_revision(cwd: Path = Path(".")) -> str | None:
    """The last commit that changed :data:`CODE`; None outside git or with uncommitted changes to it."""
    if _git(cwd, "status", "--porcelain", "--untracked-files=no", "--", *CODE) != "":
        return None  # not a git checkout (None), or the code differs from every commit
    return _git(cwd, "log", "-1", "--format=%H", "--", *CODE) or None
