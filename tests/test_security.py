"""No shell built from values: no shell=True, no os.system, stage commands free of shell syntax.

DVC and Snakemake run each stage's command line through a shell. Those command
lines come from the stage table (``hcd.pipeline``) and hold no value from
params or files except the backbone name, which the params schema only accepts
when timm (or hcd) knows it — so nothing a user or a file supplies can reach a
shell.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from hcd.errors import HcdError
from hcd.pipeline.params import load_params
from hcd.pipeline.table import STAGES

SOURCES = sorted([*REPO.glob("hcd/**/*.py"), *REPO.glob("workflow/scripts/*.py"), *REPO.glob("benchmarks/*.py")])
BANNED_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_no_shell_and_no_string_commands(path):
    for node in calls(path):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        for kw in node.keywords:
            assert not (kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)), f"{where}: shell="
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            assert (f.value.id, f.attr) not in BANNED_CALLS, f"{where}: {f.value.id}.{f.attr}"
            if f.value.id == "subprocess" and f.attr in SUBPROCESS and node.args:
                first = node.args[0]
                assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), f"{where}: a command given as a string"


def test_the_sources_were_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_stage_commands_hold_no_shell_syntax(stage):
    cmd = stage.cmd.replace("{item}", "resnet18")
    assert not re.search(r"[;&|$`<>(){}\\*?!~'\"]", cmd), cmd


@pytest.mark.parametrize("name", ["cnn;touch pwned", "$(touch pwned)", "resnet18 && reboot", "../../etc/passwd"])
def test_a_backbone_name_with_shell_syntax_is_refused_by_the_schema(tmp_path, name):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"backbones": [name]}))
    with pytest.raises(HcdError, match="backbones: .* is not a usable name"):
        load_params(f)
