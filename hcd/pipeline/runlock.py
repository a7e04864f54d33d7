"""One runner per checkout: ``dvc repro`` and ``snakemake`` must not run stages in one checkout at once.

Two engines in one checkout would train the same backbone twice, each rewriting
the other's outputs, and DVC would then record hashes of files Snakemake was
still writing. A stage script cannot hold a lock for the engine that started it
(its lifetime is one stage), so each stage start *claims the checkout for its
runner*: the engine process among its ancestors (``dvc …`` or ``snakemake …``;
the stage itself when run by hand). The claim — pid, start time, host, command —
is kept in ``.hcd/runner.json`` and changed only under an ``flock``. A stage
whose runner differs from a live claimant stops with one line naming it; stages
of one runner (Snakemake's parallel jobs) share the claim; a claim whose process
has ended, or whose pid now belongs to another process (start times differ),
is simply taken over, so a ``kill -9`` leaves nothing to clean up. Stages run by
hand (``hcd train cnn`` in two terminals) may run beside each other, not beside
an engine, and so may the jobs of a cluster workflow (each runs under a Snakemake
of its own, ``--mode remote``, started by the SLURM executor). Claims are
per host: cluster jobs on other nodes (SLURM) do not see each other's pids.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import suppress
from pathlib import Path

from hcd.errors import HcdError, excerpt

LOCK_DIR = Path(".hcd")
ENGINES = ("dvc", "snakemake")
SHARED_KINDS = ("hcd", "snakemake-job")  # runners whose stages may share a checkout with others of their kind


def _engine_of(cmdline: list[str]) -> str | None:
    """``dvc`` / ``snakemake`` when the command line runs one (``dvc repro``, ``python -m snakemake``, …)."""
    words = [os.path.basename(w) for w in cmdline[:3]]
    for engine in ENGINES:
        if engine in words or (len(cmdline) > 2 and cmdline[1] == "-m" and cmdline[2] == engine):
            return engine
    return None


def _cluster_job(cmdline: list[str]) -> bool:
    """A Snakemake started by a cluster executor to run one job (``--mode remote``), not the workflow's own."""
    return any(a == "--mode" and b == "remote" for a, b in zip(cmdline, cmdline[1:]))


def current_runner() -> dict:
    """The engine process that started this one, or this process when none did."""
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        with suppress(psutil.Error):
            cmdline = proc.cmdline()
            engine = _engine_of(cmdline)
            if engine:
                return _describe(proc, "snakemake-job" if engine == "snakemake" and _cluster_job(cmdline) else engine)
    return _describe(me, "hcd")


def _describe(proc, kind: str) -> dict:
    return {"pid": proc.pid, "started": round(proc.create_time(), 2), "host": socket.gethostname(), "kind": kind, "cmd": " ".join(proc.cmdline()[:6])[:200]}


def _alive(claim: dict) -> bool:
    import psutil

    if claim.get("host") != socket.gethostname():
        return False  # another node's process: not ours to judge
    try:
        return round(psutil.Process(int(claim["pid"])).create_time(), 2) == claim.get("started")
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _read_claim(path: Path) -> dict | None:
    """The claim in ``runner.json``, or None when there is none or the file is not one (damaged, hand-edited,
    half-written by a full disk): such a file is taken over like a dead runner's claim, never a traceback."""
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(held, dict) and isinstance(held.get("pid"), int) and not isinstance(held.get("pid"), bool) and isinstance(held.get("started"), (int, float))
    ok = ok and isinstance(held.get("host"), str) and isinstance(held.get("kind"), str) and isinstance(held.get("cmd", ""), str)
    return held if ok else None


def claim(stage: str, root: Path = Path(".")) -> None:
    """Claim the checkout for this stage's runner, or raise :class:`HcdError` naming the live one."""
    me = current_runner()
    folder = root / LOCK_DIR
    try:
        folder.mkdir(exist_ok=True)
        lock = open(folder / "runner.lock", "a+")
    except OSError:  # a read-only or full disk: the stage itself will say so about its own outputs
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for the few milliseconds of the read-modify-write
        path = folder / "runner.json"
        held = _read_claim(path)
        same = held is not None and all(held.get(k) == me[k] for k in ("pid", "started", "host"))
        # stages run by hand may run side by side, and so may the jobs of a cluster workflow (SLURM): each job
        # has a Snakemake of its own, started by the executor on the node, and the workflow's runs on the login node
        side_by_side = held is not None and held.get("kind") == me["kind"] and me["kind"] in SHARED_KINDS
        if held is not None and not same and not side_by_side and _alive(held):
            since = time.strftime("%H:%M:%S", time.localtime(held["started"]))
            raise HcdError(f"{stage}: another run holds this checkout: {held.get('kind')} (pid {held['pid']}, since {since}: {excerpt(held.get('cmd', ''), 80)}); let it finish or stop it, then rerun — two engines in one checkout would overwrite each other's outputs")
        if not same and not (side_by_side and _alive(held)):  # a live claim of the same kind stays: it outlives this stage
            tmp = path.with_name(f".runner.json.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(me))
                os.replace(tmp, path)
            except OSError:  # disk full: the claim is best effort, the stage's own writes report the problem
                tmp.unlink(missing_ok=True)
