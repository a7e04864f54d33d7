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
an engine. Claims are
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

from hcd.errors import HcdError

LOCK_DIR = Path(".hcd")
ENGINES = ("dvc", "snakemake")


def _engine_of(cmdline: list[str]) -> str | None:
    """``dvc`` / ``snakemake`` when the command line runs one (``dvc repro``, ``python -m snakemake``, …)."""
    words = [os.path.basename(w) for w in cmdline[:3]]
    for engine in ENGINES:
        if engine in words or (len(cmdline) > 2 and cmdline[1] == "-m" and cmdline[2] == engine):
            return engine
    return None


def current_runner() -> dict:
    """The engine process that started this one, or this process when none did."""
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        with suppress(psutil.Error):
            engine = _engine_of(proc.cmdline())
            if engine:
                return _describe(proc, engine)
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
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            held = None
        same = held is not None and all(held.get(k) == me[k] for k in ("pid", "started", "host"))
        both_by_hand = held is not None and held.get("kind") == me["kind"] == "hcd"  # stages run by hand may run side by side
        if held is not None and not same and not both_by_hand and _alive(held):
            since = time.strftime("%H:%M:%S", time.localtime(held["started"]))
            raise HcdError(f"{stage}: another run holds this checkout: {held.get('kind')} (pid {held['pid']}, since {since}: {held.get('cmd', '')[:80]}); let it finish or stop it, then rerun — two engines in one checkout would overwrite each other's outputs")
        if not same:
            tmp = path.with_name(f".runner.json.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(me))
                os.replace(tmp, path)
            except OSError:  # disk full: the claim is best effort, the stage's own writes report the problem
                tmp.unlink(missing_ok=True)
