"""One GPU per job: a slot allocator on file locks, so concurrent jobs never share a GPU.

Snakemake (``snakemake --cores all --resources gpu=N``) and DVC's queue
(``dvc queue start -j N``) can start several GPU stages at once, and neither
tells a job *which* GPU to use (Snakemake issue #281, DVC issue #4586): every
job would pile onto GPU 0. So each GPU stage claims free GPUs itself before
CUDA initialises, and sets ``CUDA_VISIBLE_DEVICES`` to them:

- the GPUs that count are ``HCD_GPUS`` (``0,1,3``; ``none`` turns this off), else
  the ones in ``CUDA_VISIBLE_DEVICES`` when it lists several, else every GPU the
  NVIDIA driver shows (``/proc/driver/nvidia/gpus``, no CUDA call);
- a slot is an exclusive ``flock`` on ``<lock dir>/gpu-<id>.lock``, held by the
  open file for the life of the process: the kernel drops it when the process
  ends, however it ends (``kill -9`` included), so no stale lock survives;
- with one GPU or none nothing is claimed or changed, and under SLURM (which
  hands each job its own GPUs in ``CUDA_VISIBLE_DEVICES``) a job with one GPU
  is likewise left alone;
- when every slot is taken the stage waits, saying so once, until one frees.

The lock folder is per user on this machine (``$HCD_GPU_LOCK_DIR``, default
``<tmp>/hcd-gpus-<uid>``), not per checkout: DVC's queue runs each experiment
in its own temporary copy of the repository. Inside a SLURM job it is per job,
as SLURM may renumber each job's GPUs from 0.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from hcd.errors import HcdError, excerpt

_held: list = []  # open lock files: a slot is held while its file stays open (until this process ends)
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # an index (0) or a UUID (GPU-3f2a…, MIG-…)


def _parse(raw: str, name: str) -> list[str]:
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [i for i in ids if not _ID_RE.match(i)]
    if bad or len(set(ids)) != len(ids):
        raise HcdError(f"{name}={excerpt(raw)}: expected distinct GPU indices or UUIDs separated by commas (e.g. 0,1,3), or none")
    return ids


def driver_gpus() -> list[str]:
    """GPU indices the NVIDIA driver lists, without initialising CUDA (none on a machine without one)."""
    base = Path("/proc/driver/nvidia/gpus")
    try:
        return [str(i) for i in range(sum(1 for _ in base.iterdir()))]
    except OSError:
        return []


def candidate_gpus() -> list[str]:
    """The GPUs jobs on this machine share: ``HCD_GPUS``, else ``CUDA_VISIBLE_DEVICES``, else the driver's."""
    raw = os.environ.get("HCD_GPUS", "").strip()
    if raw:
        return [] if raw.lower() == "none" else _parse(raw, "HCD_GPUS")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return _parse(visible, "CUDA_VISIBLE_DEVICES") if visible.strip() not in ("", "-1") else []
    return driver_gpus()


def lock_dir() -> Path:
    """``HCD_GPU_LOCK_DIR``, else one per user — and per SLURM job, whose GPUs SLURM may renumber from 0."""
    raw = os.environ.get("HCD_GPU_LOCK_DIR", "").strip()
    if raw:
        return Path(raw)
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return Path(tempfile.gettempdir()) / (f"hcd-gpus-{os.getuid()}" + (f"-slurm{int(job)}" if job.isdigit() else ""))


def _try(folder: Path, gpu: str):
    fh = open(folder / f"gpu-{gpu}.lock", "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")  # for people looking: who holds it (the lock, not this text, is what counts)
    fh.flush()
    return fh


def claim(n: int, what: str, poll_s: float = 1.0) -> list[str]:
    """Claim ``n`` free GPUs for this process and make them the only ones CUDA sees; [] when there is nothing to share.

    Call before anything initialises CUDA. Waits while all slots are taken.
    """
    gpus = candidate_gpus()
    if len(gpus) <= 1:
        return []
    if n > len(gpus):
        raise HcdError(f"{what}: needs {n} GPUs, but only {len(gpus)} are available ({','.join(gpus)}; HCD_GPUS sets which count)")
    folder = lock_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HcdError(f"{folder}: cannot create the GPU lock folder ({exc.strerror}); set HCD_GPU_LOCK_DIR to a writable folder") from None
    said = False
    while True:
        got = []
        for gpu in gpus:
            fh = _try(folder, gpu)
            if fh is not None:
                got.append((gpu, fh))
                if len(got) == n:
                    break
        if len(got) == n:
            _held.extend(fh for _, fh in got)
            ids = [gpu for gpu, _ in got]
            os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as nvidia-smi numbers them
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            print(f"hcd {what}: GPU slot {','.join(ids)} of {','.join(gpus)} (CUDA_VISIBLE_DEVICES={','.join(ids)})", file=sys.stderr, flush=True)
            return ids
        for _, fh in got:  # not enough: give back what we took, so two waiters cannot each hold half
            fh.close()
        if not said:
            print(f"hcd {what}: all {len(gpus)} GPU slots are taken ({folder}); waiting for one to free", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)


def release() -> None:
    """Give back every slot this process holds (the end of the process does the same)."""
    while _held:
        _held.pop().close()
