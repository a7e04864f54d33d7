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
    for words in ("params flags", "params apply", "pipeline write", "pipeline prune", "score", "demo-truth", *STAGE_MODULES):
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


def test_the_model_stages_import_timm_only_to_build_a_timm_backbone():
    """timm brings torchvision: 2 of the 5-7 s a train/predict/explain/export start took. A cnn-only job skips it."""
    code = "import sys, hcd.stages.train, hcd.stages.predict, hcd.stages.explain, hcd.stages.export; from hcd.model.factory import build_model; build_model('cnn'); print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("module", [*STAGE_MODULES.values(), "hcd.scoring", "hcd.pipeline.overlays", "hcd.pipeline.table"])
def test_every_option_of_every_command_has_help(module, monkeypatch):
    import argparse
    import importlib

    seen: list[tuple[tuple, dict]] = []
    real = argparse.ArgumentParser.add_argument

    def record(self, *args, **kw):
        seen.append((args, kw))
        return real(self, *args, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", record)
    mod = importlib.import_module(module)
    main = getattr(mod, "score_main", None) or mod.main
    with pytest.raises(SystemExit):
        main(["--help"])
    options = [a for a, kw in seen if a and a[0] not in ("-h", "--help")]
    assert options, module
    missing = [a[0] for a, kw in seen if a and a[0] not in ("-h", "--help") and not kw.get("help")]
    assert not missing, f"{module}: options without help: {missing}"


def test_summary_reads_what_either_engine_wrote(tmp_path):
    import json

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/metrics.json").write_text(json.dumps({"cnn": {"auc": 0.91, "auc_ci95": [0.88, 0.94]}, "ensemble": {"auc": 0.93, "auc_ci95": [0.9, 0.95]}, "summary": {}}))
    (tmp_path / "dvclive/cnn").mkdir(parents=True)
    (tmp_path / "dvclive/cnn/metrics.json").write_text(json.dumps({"best/epoch": 7}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results/submission.csv").write_text("id,label\na,0.5\nb,0.25\n")
    out = subprocess.run([sys.executable, "-m", "hcd", "summary", "--root", str(tmp_path)], env=ENV, capture_output=True, text=True).stdout
    assert "cnn          0.9100 (0.8800-0.9400)" in out and out.splitlines()[2].rstrip().endswith("7")
    assert "ensemble     0.9300 (0.9000-0.9500)" in out and "results/submission.csv (2 rows" in out
    empty = subprocess.run([sys.executable, "-m", "hcd", "summary", "--root", str(tmp_path / "nothing")], env=ENV, capture_output=True, text=True).stdout
    assert "run `dvc repro`" in empty


def test_a_bad_value_says_where_it_came_from_and_how_to_undo_it(tmp_path):
    from hcd.errors import HcdError
    from hcd.pipeline.params import load_params

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("lr: 0.001\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p", "--allow-empty"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("lr: -1\n")  # what a failed `dvc exp run -S lr=-1` leaves
    with pytest.raises(HcdError) as info:
        load_params(tmp_path / "params.yaml")
    assert "lr: Input should be greater than 0" in str(info.value) and "`git checkout params.yaml` restores it" in str(info.value)


def test_on_the_demo_summary_shows_the_test_auc_of_unseen_slides_beside_validation(tmp_path):
    import json

    (tmp_path / "metrics").mkdir()
    test = {"auc": 0.89, "auc_ci95": [0.86, 0.92], "n": 998}
    (tmp_path / "metrics/metrics.json").write_text(json.dumps({"cnn": {"auc": 0.95, "auc_ci95": [0.93, 0.97], "test": test}, "ensemble": {"auc": 0.96, "auc_ci95": [0.94, 0.98], "test": test}}))
    out = subprocess.run([sys.executable, "-m", "hcd", "summary", "--root", str(tmp_path)], env=ENV, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert "test AUC (95 % CI), unseen slides" in lines[0] and max(map(len, lines)) <= 120
    assert "cnn          0.9500 (0.9300-0.9700)" in out and lines[2].rstrip().endswith("0.8900 (0.8600-0.9200)")
    assert "what a split that mixes slides leaks" in out


def test_the_metrics_stage_scores_the_demo_test_side_against_the_generators_labels(tmp_path):
    import numpy as np
    import pandas as pd

    from hcd.data.synth import truth
    from hcd.pipeline.params import DemoParams
    from hcd.stages.metrics import demo_test_scores

    demo = DemoParams(n_train=40, n_test=60)
    labels = truth(demo).test
    rng = np.random.default_rng(0)
    perfect = labels.assign(prob=labels["label"].astype(float))[["id", "prob"]].iloc[2:]  # two planted-unreadable ones: not predicted
    perfect.to_csv(tmp_path / "cnn.csv", index=False)
    labels.assign(label=rng.random(len(labels)))[["id", "label"]].to_csv(tmp_path / "sub.csv", index=False)
    got = demo_test_scores(demo, {"cnn": tmp_path / "cnn.csv"}, tmp_path / "sub.csv", 200, 0)
    assert got["cnn"]["auc"] == 1.0 and got["cnn"]["n"] == 58 and 0.2 < got["ensemble"]["auc"] < 0.8
    assert set(got["cnn"]) == {"auc", "auc_ci95", "n"} and pd.Series(got["cnn"]["auc_ci95"]).between(0, 1).all()
