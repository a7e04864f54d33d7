"""One model on several processes (train.processes, torchrun, torch.distributed) — on the CPU with gloo.

- sharding: the ranks' slices of every step are exactly the single-process batch;
- the hot loop on 2 ranks equals 1 process at the same global batch. Tolerance 1e-5 (relative):
  with the same patches per step and gradients averaged across ranks, the only difference is
  the order of float sums (two half-batch gradients all-reduced vs one full-batch sum, ~1e-7
  relative per step); the model has no BatchNorm (SyncBatchNorm needs a GPU; with per-rank
  BatchNorm the statistics of half-batches would differ by design) and augmentation is off
  (each rank draws its own);
- the stage with train.processes: 2: finishes, every rank ends identical, a second run killed
  after an epoch resumes and ends bit-identical to the first;
- a rank killed with SIGKILL stops the run within a timeout with one line naming the rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, training_arrays

from hcd.data.batches import PackedBatches

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HCD_THREADS": "1", "HCD_DEVICE": "cpu"}  # gloo on the CPU, also on a GPU machine
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--monitor-interval=1"]


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_slices_of_each_step_are_the_single_process_batch(world):
    x = np.arange(40 * 96 * 96 * 3, dtype=np.uint64).astype(np.uint8).reshape(40, 96, 96, 3)
    x[:, 0, 0, 0] = np.arange(40)  # row id in the first byte
    src = PackedBatches(x, np.arange(40), np.arange(40) % 2, device="cpu")
    whole = [xb[:, 0, 0, 0].tolist() for xb, _ in src.batches(8, torch.Generator().manual_seed(3), drop_last=True)]
    parts = [[xb[:, 0, 0, 0].tolist() for xb, _ in src.batches(8, torch.Generator().manual_seed(3), drop_last=True, shard=(r, world))] for r in range(world)]
    assert len(whole) == 5 and all(len(p) == 5 for p in parts)
    for step, batch in enumerate(whole):
        assert sum((p[step] for p in parts), []) == batch


LOOP = """
import json, os, sys
import numpy as np, torch
from hcd.data.augment import AugmentConfig
from hcd.data.batches import PackedBatches, Preprocess
from hcd.runtime import distributed
from hcd.runtime.loop import Trainer, train_steps
torch.manual_seed(0)
torch.set_num_threads(1)
ranks = distributed.current()
device = distributed.start(ranks, torch.device("cpu"))
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (256, 96, 96, 3), dtype=np.uint8)
y = (np.arange(256) % 2).astype(np.float32)
x[y == 1, 40:56, 40:56] = 60
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
fwd = torch.nn.parallel.DistributedDataParallel(model) if ranks.on else model
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
aug = AugmentConfig(dihedral=False, rotate_deg=0.0, shift_px=0, brightness=0.0, contrast=0.0, hed_jitter=0.0)
t = Trainer(model, fwd, opt, sched, Preprocess(32, None, (0.5,) * 3, (0.25,) * 3), aug, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), 32, device, ranks=ranks)
losses = []
for epoch in range(3):
    total, seen = train_steps(t, PackedBatches(x, np.arange(256), y, device="cpu"), epoch, progress=False)
    losses.append(total / seen)
if ranks.main:
    print(json.dumps({"losses": losses, "seen": seen}))
distributed.finish()
"""


def test_two_gloo_ranks_train_like_one_process_at_the_same_global_batch():
    one = subprocess.run([sys.executable, "-c", LOOP], env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    code_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"hcd-ddp-loop-{os.getpid()}.py"
    code_file.write_text(LOOP)
    try:
        two = subprocess.run([*TORCHRUN, str(code_file)], env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        code_file.unlink(missing_ok=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads(one.stdout.strip().splitlines()[-1])
    b = json.loads(two.stdout.strip().splitlines()[-1])
    assert a["seen"] == b["seen"] == 256  # every patch once per epoch, across both ranks
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    assert a["losses"][2] < a["losses"][0]  # it learned: the comparison is not of two flat lines


def _train(ws: Path, *, params: str = "params.yaml", out: str = "m") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hcd", "train", "cnn", "--packed", "x.npy", "--index", "index.csv", "--split", "split.csv", "--stats", "stats.json", "--out-dir", out, "--live-dir", f"live-{out}", "--params", params], cwd=ws, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ddp_ws(tmp_path_factory):
    ws = training_arrays(tmp_path_factory.mktemp("ddp"), 192, learnable=True)
    (ws / "params.yaml").write_text(yaml.safe_dump({"backbones": ["cnn"], "models": {"cnn": {}}, "train": {"epochs": 2, "batch_size": 32, "crop": 48, "patience": 0, "processes": 2}}))
    return ws


@pytest.fixture(scope="module")
def uninterrupted(ddp_ws):
    """One uninterrupted two-process training (models a/): its stderr and weights' digest."""
    proc = _train(ddp_ws, out="a")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err, _digest(ddp_ws / "a/model.safetensors")


def test_train_with_two_processes_ends_identical_on_every_rank(ddp_ws, uninterrupted):
    err, _ = uninterrupted
    assert "all 2 ranks hold identical weights" in err and "2 data-parallel processes" in err
    meta = json.loads((ddp_ws / "a/model.json").read_text())
    assert meta["train"]["processes"] == 2 and meta["train"]["sync_bn"] is True
    assert not list((ddp_ws / "a").glob("checkpoint*.pt")) and not list(ddp_ws.glob(".*.tmp-*"))


def test_a_two_process_run_killed_after_an_epoch_resumes_and_ends_bit_identical(ddp_ws, uninterrupted):
    """Also the rerun test: a second run, cut and resumed, ends on the first run's exact weights."""
    proc = _train(ddp_ws, out="k")
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not (ddp_ws / "k/checkpoint.pt").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and both ranks
    proc.communicate()
    assert not (ddp_ws / "k/model.safetensors").exists()
    again = _train(ddp_ws, out="k")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming after epoch" in err
    assert _digest(ddp_ws / "k/model.safetensors") == uninterrupted[1]


def test_a_rank_killed_mid_run_stops_the_others_with_one_line_naming_it(ddp_ws):
    import psutil

    params = yaml.safe_load((ddp_ws / "params.yaml").read_text())
    params["train"]["epochs"] = 50  # long enough to be killed mid-run
    (ddp_ws / "long.yaml").write_text(yaml.safe_dump(params))
    proc = _train(ddp_ws, params="long.yaml", out="d")
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "1" and "hcd" in " ".join(child.cmdline()):
                    victim = child
            except psutil.Error:
                pass
        time.sleep(0.2)
    assert victim is not None, "no rank 1 process found"
    while time.time() < deadline and not (ddp_ws / "d/checkpoint.pt").exists():
        time.sleep(0.05)
    victim.kill()
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, "the other rank hung"
    assert proc.returncode == 2
    errors = [line for line in err.splitlines() if line.startswith("hcd train: error:")]
    assert len(errors) == 1 and "rank 1 of 2 died (Signal 9 (SIGKILL)" in errors[0], err[-3000:]
    assert not (ddp_ws / "d/model.safetensors").exists() and (ddp_ws / "d/checkpoint.pt").exists()  # the rerun resumes


def test_a_batch_that_does_not_split_evenly_is_one_line(ddp_ws):
    params = yaml.safe_load((ddp_ws / "params.yaml").read_text())
    params["train"]["processes"] = 3
    (ddp_ws / "three.yaml").write_text(yaml.safe_dump(params))
    proc = _train(ddp_ws, params="three.yaml", out="t")  # refused with the params, before any rank starts
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hcd train: error: three.yaml: train.batch_size: 32 (for cnn) does not split into train.processes: 3 equal shares; use a multiple of 3"), err[-2000:]
    assert "data-parallel" not in err
