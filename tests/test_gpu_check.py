"""benchmarks/run_stages.py, gpu_check.sh's step 3: the table's stages run without a shell, each inside
what is left of the lease's deadline, and a report that keeps every finished stage when a run is cut short."""

from __future__ import annotations

import json
import shutil
import sys
import time

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import run_stages  # noqa: E402


def test_jobs_follow_the_table_per_backbone_as_argv(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # backbones cnn, resnet10t
    monkeypatch.chdir(tmp_path)
    jobs = run_stages.jobs("except", {"check", "download"})
    keys = [k for k, _ in jobs]
    assert keys[:5] == ["scan", "split", "stats", "train@cnn", "train@resnet10t"]
    assert keys[-1] == "export" and "check" not in keys and "download" not in keys
    for key, argv in jobs:
        assert argv[:3] == [sys.executable, "-X", "importtime"] and argv[3].startswith("workflow/scripts/"), key
    train = dict(jobs)["train@resnet10t"]
    assert train[4] == "resnet10t" and "models/resnet10t" in train and "{item}" not in " ".join(train)
    assert [k for k, _ in run_stages.jobs("only", {"download", "check"})] == ["check", "download"]


def test_the_report_keeps_every_finished_stage_and_says_which_run_did_not_end(tmp_path):
    report = tmp_path / "gpu_check.json"
    run_stages.save(report, "only check download", {"check": 0.5, "download": 8.0}, {"check": 0.3, "download": 0.4}, "ok", False)
    run_stages.save(report, "except check download", {"scan": 1.0, "train@cnn": 60.0}, {"scan": 0.5}, "running", False)
    out = json.loads(report.read_text())  # as a run killed from outside leaves it
    assert out["stage_seconds"] == {"check": 0.5, "download": 8.0, "scan": 1.0, "train@cnn": 60.0}
    assert out["total_seconds"] == 69.5 and out["completed"] is False
    assert out["import_seconds"] == {"check": 0.3, "download": 0.4, "scan": 0.5}
    assert out["runs"] == {"only check download": "ok", "except check download": "running"}
    run_stages.save(report, "except check download", {"scan": 1.0, "train@cnn": 60.0, "predict@cnn": 20.0}, {}, "ok", False)
    out = json.loads(report.read_text())
    assert out["completed"] is True and out["total_seconds"] == 89.5
    run_stages.save(report, "except check download", {"predict@cnn": 400.0}, {}, "failed", False)
    assert json.loads(report.read_text())["completed"] is False
    assert not list(tmp_path.glob("*.tmp"))


def test_a_stage_still_running_at_the_deadline_is_stopped_and_reported(capsys):
    t0 = time.perf_counter()
    seconds, _, ok = run_stages.run_one("train@cnn", [sys.executable, "-c", "import time; time.sleep(60)"], time.time() + 1)
    assert not ok and seconds < 10 and time.perf_counter() - t0 < 10
    assert "train@cnn: stopped after" in capsys.readouterr().out
    seconds, _, ok = run_stages.run_one("ensemble", [sys.executable, "-c", "import sys; sys.exit(3)"], time.time() + 60)
    assert not ok


def test_import_seconds_sum_the_top_level_imports_and_leave_the_stage_output():
    err = "import time: self [us] | cumulative | imported package\nimport time:       120 |        120 |   _io\nimport time:    300000 |    1500000 | torch\nimport time:        10 |     250000 | pandas\ntrain cnn: epoch 1\n"
    seconds, slowest, rest = run_stages.import_seconds(err)
    assert seconds == 1.75 and rest == "train cnn: epoch 1"
    assert list(slowest) == ["torch", "_io", "pandas"] and slowest["torch"] == 0.3
