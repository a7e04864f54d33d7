"""One GPU per job (hcd.runtime.gpuslots), on the CPU machine with fake GPU ids (HCD_GPUS).

Concurrent jobs never hold one slot at once, a `kill -9`'d job's slot is taken
by the next one at once, one GPU or none changes nothing, bad values are one line.
That whole pipelines run with distinct slots and equal a sequential run is
checked in tests/test_e2e.py (Snakemake trains two backbones at once there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from hcd.errors import HcdError
from hcd.runtime import gpuslots

HOLD = (
    "import json, os, sys, time\n"
    "from hcd.runtime import gpuslots\n"
    "ids = gpuslots.claim(1, 'test', poll_s=0.05)\n"
    "start = time.time()\n"
    "print('claimed', flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
    "print(json.dumps({'ids': ids, 'visible': os.environ['CUDA_VISIBLE_DEVICES'], 'start': start, 'end': time.time()}), flush=True)\n"
)


def _env(tmp_path: Path, gpus: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    return env | {"HCD_GPUS": gpus, "HCD_GPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(REPO)}


def _holder(tmp_path: Path, gpus: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], env=_env(tmp_path, gpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    procs = [_holder(tmp_path, "0,1,2", 0.6) for _ in range(7)]  # 7 jobs, 3 slots: they queue
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        runs.append(json.loads(out.splitlines()[-1]))
    assert all(len(r["ids"]) == 1 and r["visible"] == r["ids"][0] for r in runs)
    assert {r["ids"][0] for r in runs} <= {"0", "1", "2"}
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a["ids"] == b["ids"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], f"slot {a['ids']} held by two jobs at once"
    assert len({r["ids"][0] for r in runs}) == 3, "all three slots were used"


def test_a_killed_jobs_slot_is_taken_by_the_next_at_once(tmp_path):
    a = _holder(tmp_path, "0,1", 600)
    b = _holder(tmp_path, "0,1", 600)
    for p in (a, b):
        assert p.stdout.readline().strip() == "claimed"
    waiter = _holder(tmp_path, "0,1", 0)
    time.sleep(1.0)
    assert waiter.poll() is None, "a third job got a slot while both were held"
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    t0 = time.time()
    out, err = waiter.communicate(timeout=60)
    b.kill()
    b.wait()
    assert waiter.returncode == 0, err
    assert "all 2 GPU slots are taken" in err and err.count("waiting") == 1  # said once, not once a poll
    assert time.time() - t0 < 10
    assert json.loads(out.splitlines()[-1])["ids"] in (["0"], ["1"])


def test_one_gpu_or_none_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HCD_GPU_LOCK_DIR", str(tmp_path / "locks"))
    for value in ("0", "none", "NONE"):
        monkeypatch.setenv("HCD_GPUS", value)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert gpuslots.claim(1, "test") == []
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.delenv("HCD_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # SLURM gave this job one GPU: left alone
    assert gpuslots.claim(1, "test") == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpuslots.claim(1, "test") == []
    assert not (tmp_path / "locks").exists()


def test_cuda_visible_devices_with_several_is_shared_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HCD_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("HCD_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3f2a,GPU-77c1")
    try:
        assert gpuslots.claim(1, "test") == ["GPU-3f2a"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-3f2a"
    finally:
        gpuslots.release()


def test_a_slurm_job_locks_in_a_folder_of_its_own(monkeypatch):
    monkeypatch.delenv("HCD_GPU_LOCK_DIR", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    assert gpuslots.lock_dir().name == f"hcd-gpus-{os.getuid()}-slurm4711"


@pytest.mark.parametrize("value", ["0,0", "0;rm -rf ~", "../x", "0, ,1" + "x" * 70])
def test_a_bad_gpu_list_is_one_line(monkeypatch, value):
    monkeypatch.setenv("HCD_GPUS", value)
    with pytest.raises(HcdError, match=r"^HCD_GPUS=.*expected distinct GPU indices"):
        gpuslots.candidate_gpus()


def test_asking_for_more_gpus_than_there_are_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HCD_GPUS", "0,1")
    monkeypatch.setenv("HCD_GPU_LOCK_DIR", str(tmp_path))
    with pytest.raises(HcdError, match=r"train: needs 4 GPUs, but only 2 are available \(0,1;"):
        gpuslots.claim(4, "train")


def test_every_gpu_stage_asks_snakemake_for_a_gpu():
    from hcd.pipeline.table import STAGES
    from hcd.stages import GPU_STAGES

    assert {s.name for s in STAGES if s.resources.get("gpu")} == set(GPU_STAGES)
