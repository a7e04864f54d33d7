"""dvc.yaml and the Snakefile agree on every stage's command, inputs, outputs and params."""

from __future__ import annotations

import re
import subprocess

import yaml

from conftest import REPO
from hcd.params import load_params
from hcd.pipeline import STAGES, render_dvc_yaml, snakemake_params


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def snakemake_jobs() -> dict[str, dict]:
    """What Snakemake itself would run: rule -> {input, output, cmd}, from a forced dry run."""
    out = subprocess.run(["snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m or m.group(1) == "all":
            continue
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, re.M))
        cmd = re.search(r"^Shell command: (.*)$|^\s{4}(python .*)$", block, re.M)
        jobs[m.group(1)] = {
            "input": fields.get("input", "").split(", "),
            "output": fields.get("output", "").split(", "),
            "cmd": (cmd.group(1) or cmd.group(2)).strip(),
        }
    return jobs


def test_dvc_yaml_is_rendered_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), "run `hcd pipeline write`"


def test_both_engines_have_the_same_stages_commands_inputs_and_outputs():
    dvc, snake = dvc_stages(), snakemake_jobs()
    assert list(dvc) == [s.name for s in STAGES]
    assert set(snake) == set(dvc), "one Snakemake rule per dvc.yaml stage"
    for name, stage in dvc.items():
        job = snake[name]
        assert job["cmd"] == stage["cmd"], name
        assert sorted(job["input"]) == sorted(stage["deps"]), name
        dvc_outs = list(stage.get("outs", [])) + [next(iter(m)) for m in stage.get("metrics", [])]
        assert sorted(job["output"]) == sorted(dvc_outs), name


def test_both_engines_track_the_same_params():
    """DVC's params: keys and the Snakemake params: values come from one list per stage."""
    params = load_params(REPO / "params.yaml")
    dvc = dvc_stages()
    for stage in STAGES:
        assert dvc[stage.name].get("params", []) == list(stage.params)
        assert set(snakemake_params(params, stage)) == {k.replace(".", "__") for k in stage.params}


def test_every_declared_input_exists_or_is_produced():
    produced = {o for s in STAGES for o in s.outputs}
    for stage in STAGES:
        for dep in stage.inputs:
            assert dep in produced or (REPO / dep).exists(), f"{stage.name}: {dep}"


def test_stage_scripts_are_thin():
    for stage in STAGES:
        lines = [l for l in (REPO / stage.script).read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        assert len(lines) < 20, f"{stage.script}: stage logic belongs in hcd/"
