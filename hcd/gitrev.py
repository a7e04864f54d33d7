"""The git commit a result was made at: recorded in the export manifest and in a Kaggle
submission's message. Its own module so that ``hcd submit`` does not import the export
stage (and with it torch and timm) for one ``git rev-parse``."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision(cwd: Path = Path(".")) -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
