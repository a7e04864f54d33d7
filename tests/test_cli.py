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


def test_the_shipped_timm_names_are_the_installed_timms():
    """Backbone names are checked against a shipped list (no torch import at parse time); it must be current."""
    import timm

    from hcd.model import names

    version, shipped = names._shipped()
    if version != timm.__version__:
        pytest.skip(f"timm {timm.__version__} installed, list is for {version}: names.is_backbone asks timm itself")
    assert shipped == frozenset(timm.list_models()), "run `python -m hcd.model.names`"
    assert names.is_backbone("resnet18") and names.is_backbone("resnet18.a1_in1k") and names.is_backbone("cnn")
    assert not names.is_backbone("resnt18")


def test_validating_params_imports_no_torch():
    code = "import sys; from hcd.pipeline.params import load_params; load_params('params.yaml'); import hcd.pipeline.table; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stdout + out.stderr
