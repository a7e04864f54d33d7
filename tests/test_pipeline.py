"""dvc.yaml and the Snakefile agree on every stage's command, inputs, outputs and params."""

from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import yaml
from conftest import REPO

from hcd.pipeline.params import load_params
from hcd.pipeline.table import CHECKED, ITEM, SNAKEMAKE_LOG_SUFFIX, STAGES, render_dvc_yaml, snakemake_params


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def dvc_jobs() -> dict[str, dict]:
    """What DVC itself resolves: stage address (train@cnn) -> cmd, deps, outs, params keys."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        jobs = {}
        for st in repo.index.stages:
            params = sorted(k for d in st.deps if hasattr(d, "params") and d.params for k in d.params)
            jobs[st.addressing] = {
                "cmd": st.cmd,
                "deps": sorted(d.def_path for d in st.deps if not (hasattr(d, "params") and d.params is not None and d.def_path.endswith("params.yaml"))),
                "outs": sorted(o.def_path for o in st.outs),
                "params": params,
            }
        return jobs


def snakemake_jobs() -> dict[str, dict]:
    """What Snakemake itself would run: job (rule, or rule@backbone) -> input, output, cmd, from a forced dry run."""
    out = subprocess.run(["snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m or m.group(1) == "all":
            continue
        fields = dict(re.findall(r"^\s+(input|output|wildcards): (.*)$", block, re.M))
        cmd = re.search(r"^Shell command: (.*)$", block, re.M)
        wild = fields.get("wildcards", "")
        name = m.group(1) + (f"@{wild.split('=', 1)[1]}" if wild else "")
        log = re.search(r"^\s+log: (.*)$", block, re.M)
        shell = cmd.group(1).strip()
        suffix = SNAKEMAKE_LOG_SUFFIX.replace("{log}", log.group(1).strip() if log else "")
        assert shell.endswith(suffix), f"{name}: the Snakemake command must end in its log's tee: {shell}"
        jobs[name] = {"input": sorted(fields.get("input", "").split(", ")), "output": sorted(fields.get("output", "").split(", ")), "cmd": shell.removesuffix(suffix)}
    return jobs


def test_dvc_yaml_is_rendered_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), "run `hcd pipeline write`"


def test_both_engines_have_the_same_stages_commands_inputs_and_outputs():
    dvc, snake = dvc_jobs(), snakemake_jobs()
    params = load_params(REPO / "params.yaml")
    assert set(snake) == set(dvc), "one Snakemake job per resolved DVC stage (train@cnn, ...)"
    assert {n.split("@")[0] for n in dvc} == {s.name for s in STAGES}
    for name, stage in dvc.items():
        job = snake[name]
        assert job["cmd"] == stage["cmd"], name
        assert job["output"] == stage["outs"], name
        # a DVC folder dependency (gathered per-backbone files) stands for the files Snakemake lists in it
        folders = [d for d in stage["deps"] if any(i.startswith(d + "/") for i in job["input"])]
        folded = sorted({next((d for d in folders if i.startswith(d + "/")), i) for i in job["input"]})
        # the check marker is a DVC dependency only: Snakemake validates params.yaml while reading the Snakefile
        assert folded == [d for d in stage["deps"] if d != CHECKED], name
        assert (CHECKED in stage["deps"]) == (name != "check"), name
        gathered = next(s for s in STAGES if s.name == name.split("@")[0]).gather_dirs()
        for d in folders:
            listed = {i.split("/")[1] for i in job["input"] if i.startswith(d + "/")}
            if d in gathered:
                assert listed == set(params.backbones), f"{name}: {d}/ must hold every backbone's files"
            else:  # a source folder (data/groups): Snakemake lists its files, so an in-place edit reruns
                assert sorted(i for i in job["input"] if i.startswith(d + "/")) == sorted(str(p.relative_to(REPO)) for p in (REPO / d).rglob("*") if p.is_file()), f"{name}: {d}/"


def test_both_engines_track_the_same_params():
    """DVC's params: keys and the Snakemake params: values come from one list per stage; a per-backbone
    key (train's ``models.{item}``) is each backbone's own entry in both."""
    params = load_params(REPO / "params.yaml")
    jobs = dvc_jobs()
    for stage in STAGES:
        names = [n for n in jobs if n.split("@")[0] == stage.name]
        for n in names:
            own = [k.replace(ITEM, n.partition("@")[2]) for k in stage.params]
            assert jobs[n]["params"] == sorted(own), n
        values = snakemake_params(params, stage)
        assert set(values) == {k.replace(ITEM, "item").replace(".", "__") for k in stage.params}
        for key, value in values.items():
            if callable(value):  # evaluated per job, with the job's backbone
                assert key == "models__item" and stage.per_backbone
                for b in params.backbones:
                    assert value(SimpleNamespace(backbone=b)) == params.models[b].model_dump(mode="json")
    train = next(s for s in STAGES if s.name == "train")
    assert "models" not in train.params, "each backbone's training reads its own models entry, not every backbone's"


def test_every_declared_input_exists_or_is_produced():
    produced = {o for s in STAGES for o in s.outputs}
    for stage in STAGES:
        for dep in stage.inputs:
            assert dep in produced or (REPO / dep).exists(), f"{stage.name}: {dep}"
        for g in stage.gather:
            assert g in produced, f"{stage.name}: {g} is not a per-backbone output"


def test_stage_scripts_are_thin():
    for stage in STAGES:
        lines = [line for line in (REPO / stage.script).read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert len(lines) < 20, f"{stage.script}: stage logic belongs in hcd/"


def test_one_list_of_stage_names_for_the_table_the_cli_and_the_scripts():
    from hcd.cli import STAGE_MODULES
    from hcd.stages import NAMES

    assert tuple(s.name for s in STAGES) == NAMES
    assert list(STAGE_MODULES) == list(NAMES)
    for stage in STAGES:
        assert stage.script == f"workflow/scripts/{stage.name}.py"
        assert f"from hcd.stages.{stage.name} import main" in (REPO / stage.script).read_text()


def _hcd_imports(path) -> set[str]:
    """hcd source files a module imports (anywhere in it, function-level imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            file = REPO.joinpath(*name.split(".")).with_suffix(".py")
            if name.startswith("hcd") and file.exists():
                found.add(str(file.relative_to(REPO)))
    return found


# Shared plumbing every stage uses, deliberately not a code dependency (table.py's docstring says why);
# names.py is read by params validation; metrics reads env.py for the versions it records.
NOT_DEPS = {"hcd/atomic.py", "hcd/pipeline/params.py", "hcd/cli.py", "hcd/errors.py", "hcd/pipeline/runlock.py", "hcd/pipeline/table.py", "hcd/model/names.py"}


def test_every_module_a_stage_runs_is_a_code_dependency_of_it():
    """A module a stage imports but does not declare would change the stage's results without DVC rerunning it."""
    from hcd.pipeline.table import STAGES

    for stage in STAGES:
        seen, todo = set(), [f"hcd/stages/{stage.name}.py"]
        while todo:
            f = todo.pop()
            if f not in seen:
                seen.add(f)
                if f not in NOT_DEPS:  # plumbing's own imports are plumbing (table.py's `hcd pipeline prune` is check's)
                    todo += _hcd_imports(REPO / f)
        missing = seen - set(stage.deps) - NOT_DEPS - ({"hcd/env.py"} if stage.name == "metrics" else set())
        assert not missing, f"{stage.name} runs {sorted(missing)} but does not depend on it (hcd/pipeline/table.py)"


def test_a_model_folders_files_are_the_ones_the_table_declares(tmp_path):
    """train writes, and predict, explain and export read, a model *folder* (``models/<b>``): its files are the
    model format of hcd.model.weights. The table declares those same files as train's outputs and the readers' inputs."""
    import torch

    from hcd.atomic import Commit
    from hcd.model.weights import save_model

    with Commit() as commit:
        save_model(tmp_path / "m", {"w": torch.zeros(1)}, {"backbone": "cnn"}, commit)
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    stages = {s.name: s for s in STAGES}
    assert sorted(o.rsplit("/", 1)[1] for o in stages["train"].outs) == written
    for reader in ("predict", "explain"):
        assert sorted(d.rsplit("/", 1)[1] for d in stages[reader].deps if d.startswith(f"models/{ITEM}/")) == written, reader
    assert sorted(g.rsplit("/", 1)[1] for g in stages["export"].gather) == written


def test_prune_finds_every_place_a_dropped_backbone_wrote_and_nothing_else(tmp_path, capsys):
    """Derived from the table: models/, predictions/, explain/, dvclive/ and the per-backbone logs. A folder without
    a file the table names (local weights), a dot-entry and a kept backbone stay; a symlinked leftover is unlinked,
    its target kept; the check stage warns while anything is left."""
    from hcd.pipeline.prune import prune, stale_outputs
    from hcd.stages.check import main as check_main

    files = ["models/old/model.json", "models/old/checkpoint.pt", "predictions/old/val.csv", "explain/old/tiles.csv",
             "dvclive/old/metrics.json", "logs/train/old.log", "logs/predict/old.log",
             "models/cnn/model.json", "predictions/cnn/val.csv", "logs/train/cnn.log",
             "models/pretrained/resnet.pth", "models/notes.txt", "models/.cache/model.json", "logs/check.log"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    (outside / "linked").mkdir(parents=True)
    (outside / "linked/val.csv").write_text("x")
    (tmp_path / "predictions/linked").symlink_to(outside / "linked")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["backbones"], params["models"] = ["cnn"], {"cnn": params["models"]["cnn"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    expect = sorted(tmp_path / f for f in ["models/old", "predictions/old", "predictions/linked", "explain/old", "dvclive/old",
                                           "logs/train/old.log", "logs/predict/old.log"])
    assert sorted(stale_outputs(["cnn"], tmp_path)) == expect
    check_main([str(tmp_path / "params.yaml"), "--out", str(tmp_path / "data/check/params.json")])
    assert "warning: dvclive/old, explain/old, logs/predict/old.log and 4 more: left by a backbone" in capsys.readouterr().err
    assert prune(["cnn"], tmp_path, dry_run=True) == expect and all(p.exists() or p.is_symlink() for p in expect)
    prune(["cnn"], tmp_path)
    assert not any(p.exists() or p.is_symlink() for p in expect)
    assert (outside / "linked/val.csv").exists(), "pruning followed a symlink out of the workspace"
    assert all((tmp_path / f).exists() for f in files[7:]), "pruning removed something that was not a dropped backbone's output"
    assert stale_outputs(["cnn"], tmp_path) == []
    check_main([str(tmp_path / "params.yaml"), "--out", str(tmp_path / "data/check/params.json")])
    assert "warning" not in capsys.readouterr().err
