"""One model over several processes: data-parallel training with ``torch.distributed``, started by torchrun.

``train.processes: N`` (N >= 2) makes the train stage start itself again under
``torchrun --standalone --nproc-per-node N`` (or run that yourself, see README).
Every process (rank) opens the same packed array and draws the same seeded
permutation each epoch; of every global batch of ``train.batch_size`` patches rank
r takes the r-th of N equal slices (:meth:`hcd.data.batches.PackedBatches.batches`),
so one step of N ranks sees exactly the batch one process would. Gradients are
averaged across ranks (``DistributedDataParallel``), so with BatchNorm synced the
update equals the single-process one up to the order of float sums — the lr needs no
scaling: ``batch_size`` is already the global batch. Each rank keeps its own
GPU-resident copy of the data, augments with its own generator, validates the
whole validation side (so every rank makes the same early-stopping decision), and
only rank 0 writes (checkpoints, which carry every rank's generator state, the
curves, the model). The backend is NCCL on GPUs and gloo on the CPU; SyncBatchNorm
needs a GPU, so on the CPU each rank normalises over its own slice.

A rank that dies makes torchrun stop the others; the stage then stops with one line
naming the rank and how it ended (:func:`launch`), and a rerun resumes from the last
epoch's checkpoint. A collective that waits longer than ``HCD_DIST_TIMEOUT`` seconds
(default 600) for a peer fails instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hcd.errors import HcdError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Ranks:
    if not under_torchrun():
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a ``kill -9`` of the stage's process group (what
    DVC, Snakemake and the tests do) would leave the ranks running on, writing. On Linux a rank asks the kernel
    to kill it when its parent (torchrun's agent) dies, and stops at once if that has already happened."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before the request: nobody will stop us
        os._exit(137)


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group; the device this rank computes on (its own GPU, or the CPU)."""
    if not ranks.on:
        return device
    from hcd import env

    if device.type == "cuda":
        if ranks.local >= torch.cuda.device_count():
            raise HcdError(f"train.processes: {ranks.world} processes need {ranks.world} GPUs on this machine, but CUDA sees {torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        torch.cuda.set_device(ranks.local)
        device = torch.device("cuda", ranks.local)
    if not dist.is_initialized():
        timeout = env.env_int("HCD_DIST_TIMEOUT", 600, 10, 86400)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    return device


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP does this before each forward pass
    in training; after an epoch's last step each rank still holds its own updates, so validation and the saved
    weights would differ between ranks without it."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def gather(obj):
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_weights(state: dict[str, torch.Tensor], what: str) -> int:
    """Every rank must end with the same weights (DDP keeps them in step); else stop before anything is written."""
    digests = gather(state_digest(state))
    if len(set(digests)) != 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise HcdError(f"{what}: ranks {differ} ended with weights that differ from rank 0's; model not written")
    return len(digests)


_WORKER_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")  # torchrun --tee: a worker's own output line, by local rank
_ROOT = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)")
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
_CAUSE = re.compile(r"traceback\s*:\s*(.+)")


def launch(n: int, argv: list[str], what: str) -> None:
    """Run ``hcd <argv>`` as ``n`` ranks under torchrun; their output passes through, torchrun's own is kept back.

    A failure becomes one :class:`HcdError`: the stage's own error when a rank reported one
    (``hcd train: error: …``), else which rank died and how.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])), "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # each rank sets its own share of the CPUs (hcd.stages.train)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "--tee=3", "--monitor-interval=1", "-m", "hcd", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", preexec_fn=die_with_launcher)  # noqa: PLW1509 - prctl only, before exec
    own_errors: list[str] = []
    agent: list[str] = []
    prefix = f"hcd {argv[0]}: error: "
    try:
        for line in proc.stdout:
            m = _WORKER_LINE.match(line.rstrip("\n"))
            if not m:
                agent.append(line)
                continue
            text = m.group(2)
            if text.startswith(prefix):
                own_errors.append(text[len(prefix) :])
            elif m.group(1) == "0" or text.startswith(("hcd ", "Traceback", "  ")) or "Error" in text:
                print(text if m.group(1) == "0" else f"[rank {m.group(1)}] {text}", file=sys.stderr, flush=True)
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # SIGTERM to torchrun: it stops every rank (each removes its temporaries)
        proc.wait()
        raise
    if rc == 0:
        return
    if own_errors:
        raise HcdError(own_errors[0])
    report = "".join(agent).split("Root Cause", 1)[-1]  # torchrun lists every rank it stopped; the root cause comes last
    rank, code, cause = _ROOT.search(report), _EXIT.search(report), _CAUSE.search(report)
    signalled = cause is not None and cause.group(1).strip().startswith("Signal")
    how = cause.group(1).strip() if signalled else (f"exit code {code.group(1)}, its messages are above" if code else f"torchrun exit code {rc}")
    who = f"rank {rank.group(1)} of {n}" if rank else f"one of {n} ranks"
    raise HcdError(f"{what}: {who} died ({how}); torchrun stopped the others; rerun to resume from the last epoch's checkpoint")
