"""Scale-out, side by side in one run: data-parallel ranks ÷ one process, SLURM ÷ local.

Usage:
    python benchmarks/bench_scaleout.py [--ranks 2] [--steps 30] [--no-slurm] [--out benchmarks/out/scaleout.json]

1. DDP: the training hot loop (``hcd.runtime.loop``, the small CNN, crop 64, batch 64
   global) for ``--steps`` steps after a warm-up, in one process and under
   ``torchrun --nproc-per-node N`` at the same global batch; patches/s from inside the
   loop (start-up excluded). On the CPU both sides share the same cores (one process
   with all threads vs N ranks splitting them): the ratio weighs intra-op threading
   against data parallelism plus the all-reduce, not more hardware. With several GPUs
   each rank gets its own and the ratio ÷ N is the scaling efficiency; with one GPU
   there is nothing to scale (said so).
2. SLURM: the tiny demo pipeline (as tests/test_e2e.py) through profiles/slurm on the
   one-node SLURM of tests/cluster/slurm.sh, ÷ the same pipeline with plain
   ``snakemake --cores 2``, in fresh copies; the ratio is SLURM's overhead (sbatch,
   srun, a Snakemake per job, status polling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LOOP = """
import json, os, sys, time
import numpy as np, torch
from hcd import env
from hcd.data.augment import AugmentConfig
from hcd.data.batches import PackedBatches, Preprocess
from hcd.model.factory import build_model
from hcd.runtime import distributed
from hcd.runtime.device import pick_device, set_threads
from hcd.runtime.loop import Trainer, train_steps
steps, batch = int(sys.argv[1]), int(sys.argv[2])
ranks = distributed.current()
threads = set_threads(ranks.world)
device = distributed.start(ranks, pick_device())
torch.manual_seed(0)
x = np.random.default_rng(0).integers(0, 256, (4096, 96, 96, 3), dtype=np.uint8)
y = (np.arange(4096) % 2).astype(np.float32)
model = build_model("cnn").to(device)
fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ranks.on else model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
t = Trainer(model, fwd, opt, sched, Preprocess(64, None, (0.5,) * 3, (0.25,) * 3), AugmentConfig(), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), batch, device, ranks=ranks)
src = PackedBatches(x, np.arange(4096), y, device=device)
train_steps(t, src, 0, max_steps=5, progress=False)  # warm-up
if device.type == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
_, seen = train_steps(t, src, 1, max_steps=steps, progress=False)
if device.type == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
if ranks.main:
    print(json.dumps({"patches_per_s": seen / dt, "seen": seen, "threads": threads, "device": str(device)}))
distributed.finish()
"""


def ddp(ranks: int, steps: int, batch: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "loop.py"
        script.write_text(LOOP)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        one = subprocess.run([sys.executable, str(script), str(steps), str(batch)], env=env, capture_output=True, text=True, check=True)
        many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(script), str(steps), str(batch)], env=env, capture_output=True, text=True)
        if many.returncode != 0:
            raise SystemExit(many.stderr[-3000:])
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (one, many))
    gpus = torch.cuda.device_count()
    out = {"ranks": ranks, "global_batch": batch, "steps": steps, "one_process_patches_per_s": round(a["patches_per_s"], 1), "ranks_patches_per_s": round(b["patches_per_s"], 1), "ratio": round(b["patches_per_s"] / a["patches_per_s"], 3), "device": a["device"], "threads_one": a["threads"], "threads_per_rank": b["threads"]}
    if gpus >= ranks:
        out["scaling_efficiency"] = round(out["ratio"] / ranks, 3)
    out["note"] = f"{gpus} GPUs: scaling efficiency measured" if gpus >= ranks else ("one GPU: nothing to scale across" if gpus == 1 else "CPU: both sides use the same cores (1 process x all threads vs ranks splitting them)")
    return out


def slurm() -> dict:
    import test_e2e as e2e  # the tiny demo config and repo copies of the tests
    import test_e2e_interrupted as runs  # their SLURM command line

    up = subprocess.run(["bash", str(REPO / "tests/cluster/slurm.sh"), "start"], capture_output=True, text=True)
    if up.returncode != 0:
        return {"skipped": (up.stderr.strip().splitlines() or ["?"])[-1]}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, cmd in (("local", ("snakemake", "--cores", "2")), ("slurm", runs.SLURM_RUN)):
            root = e2e.repo_copy(Path(tmp) / kind)
            t0 = time.perf_counter()
            e2e.sh(root, *cmd)
            times[kind] = time.perf_counter() - t0
            digest = e2e.digests(root)
            times[f"{kind}_digest"] = digest
            shutil.rmtree(root / "data", ignore_errors=True)
    same = times.pop("local_digest") == times.pop("slurm_digest")
    return {"local_s": round(times["local"], 1), "slurm_s": round(times["slurm"], 1), "ratio": round(times["slurm"] / times["local"], 2), "outputs_identical": same, "jobs": len(e2e.ALL_STAGES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-slurm", action="store_true")
    ap.add_argument("--out", default="benchmarks/out/scaleout.json")
    args = ap.parse_args()
    out = {"ddp": ddp(args.ranks, args.steps, args.batch)}
    d = out["ddp"]
    print(f"DDP: {d['ranks']} ranks {d['ranks_patches_per_s']:.0f} patches/s ÷ 1 process {d['one_process_patches_per_s']:.0f} patches/s = {d['ratio']} at global batch {d['global_batch']} ({d['note']})")
    if not args.no_slurm:
        out["slurm"] = s = slurm()
        if "skipped" in s:
            print(f"SLURM: skipped ({s['skipped']})")
        else:
            print(f"SLURM: tiny pipeline {s['slurm_s']} s through SLURM ÷ {s['local_s']} s local = {s['ratio']} ({s['jobs']} jobs; outputs identical: {s['outputs_identical']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
