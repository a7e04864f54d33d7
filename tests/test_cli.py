"""The `hcd` command line: help works everywhere and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from hcd.cli import STAGE_MODULES

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("cmd", [["--help"], ["demo-truth", "--help"], ["score", "--help"], ["params", "--help"], ["pipeline", "--help"], *[[s, "--help"] for s in STAGE_MODULES]])
def test_help_prints_usage_and_writes_nothing(tmp_path, cmd):
    proc = subprocess.run([sys.executable, "-m", "hcd", *cmd], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() or "Usage" in proc.stdout
    assert list(tmp_path.iterdir()) == [], f"`hcd {' '.join(cmd)}` wrote {list(tmp_path.iterdir())}"


def test_top_level_help_names_every_command_the_readme_uses():
    out = subprocess.run([sys.executable, "-m", "hcd", "--help"], env=ENV, capture_output=True, text=True).stdout
    for words in ("params flags", "params apply", "pipeline write", "score", "demo-truth", *STAGE_MODULES):
        assert words in out, words
    assert "``" not in out, "raw reStructuredText in the help"
