"""Faults: SIGKILL at random moments in every stage, and a disk that fills up.

A tiny demo pipeline is run once, stage by stage, with the exact command lines
both engines use (``hcd.pipeline``), counting the temporary files each stage
creates (inotify). Then, for each stage, copies of that workspace get the stage
started and killed with SIGKILL (the whole process group: scan's workers too) on
an event, not a clock: when the stage creates its n-th temporary file (n seeded
at random among those the reference run created), plus a seeded delay of up to
50 ms that lands mid-write. Load slows the stage and the watcher alike, so it
cannot make a kill miss. Whatever the kill leaves must be nothing or a complete
output, and rerunning the stage must give byte-for-byte the outputs of the
uninterrupted run. Training is also killed right after an epoch's checkpoint and
must resume, not restart.

The disk-full cases run each stage under ``RLIMIT_FSIZE`` (writes past the limit
fail with EFBIG, as they would with ENOSPC): one line naming the file, exit 2,
every previous output byte-identical, no temporary left behind. Where a tmpfs
can be mounted in a private namespace (``unshare``), a real ENOSPC is tried too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import resource
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from hcd.atomic import OUTPUT_ROOTS, TMP_MARK
from hcd.pipeline.table import STAGES

PARAMS = {
    "backbones": ["cnn"],
    "models": {"cnn": {}},
    "data": {"source": "demo", "demo": {"n_train": 240, "n_test": 30, "n_slides": 12}},
    "train": {"epochs": 3, "batch_size": 32, "crop": 48, "patience": 0},
    "predict": {"tta": 2, "batch_size": 64},
    "metrics": {"bootstrap": 20},
}
ENV = {**os.environ, "HCD_WORKERS": "2", "HCD_THREADS": "2", "PYTHONDONTWRITEBYTECODE": "1"}
ORDER = ["check", "download", "scan", "split", "stats", "train@cnn", "predict@cnn", "ensemble", "metrics"]
KILLED = ["scan", "split", "stats", "train@cnn", "predict@cnn", "ensemble", "metrics"]
KILLS_PER_STAGE = int(os.environ.get("HCD_FAULT_KILLS", "2"))  # 2 keep CI inside its time; HCD_FAULT_KILLS=10 for a deeper run


def stage(name: str):
    base, _, item = name.partition("@")
    st = next(s for s in STAGES if s.name == base)
    sub = (lambda s: s.replace("{item}", item)) if item else (lambda s: s)
    return shlex.split(sub(st.cmd)), [sub(o) for o in st.outputs]


def run_stage(ws: Path, name: str, **kw) -> subprocess.CompletedProcess:
    argv, _ = stage(name)
    return subprocess.run([sys.executable, *argv[1:]], cwd=ws, env=ENV, capture_output=True, text=True, **kw)


def snapshot(ws: Path) -> dict[str, str]:
    """Digest of every file under the output folders (temporaries included: none may survive)."""
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for root in OUTPUT_ROOTS for p in sorted((ws / root).rglob("*")) if p.is_file()}


def temporaries(ws: Path) -> list[str]:
    return [str(p.relative_to(ws)) for p in ws.rglob("*") if TMP_MARK in p.name]


def output_files(ws: Path, outputs: list[str]) -> list[str]:
    files = []
    for o in outputs:
        p = ws / o
        files += [str(f.relative_to(ws)) for f in p.rglob("*") if f.is_file()] if p.is_dir() else [o] if p.exists() else []
    return files


def remove(ws: Path, outputs: list[str]) -> None:
    for o in outputs:
        p = ws / o
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


class TempWatch:
    """Temporary files (``.tmp-`` names) created anywhere under a workspace's output folders and ``.hcd``, as the kernel
    reports them (inotify, folders made later included): none is missed, however briefly it lived."""

    IN_CREATE, IN_ISDIR = 0x100, 0x40000000

    def __init__(self, ws: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs: dict[int, Path] = {}
        self.seen: list[str] = []
        for root in (*OUTPUT_ROOTS, ".hcd"):  # .hcd: the commit journal and the runner lock are written atomically too
            (ws / root).mkdir(exist_ok=True)
            self._watch(ws / root)

    def _watch(self, folder: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_CREATE)
        if wd >= 0:  # a folder gone already (a swapped-in temporary) is no loss
            self.dirs[wd] = folder
            for child in folder.iterdir():  # what was made before the watch began
                self._found(child)

    def _found(self, path: Path) -> None:
        if TMP_MARK in path.name and str(path) not in self.seen:
            self.seen.append(str(path))
        if path.is_dir() and not path.is_symlink() and path not in self.dirs.values():
            self._watch(path)

    def wait(self, count: int, proc: subprocess.Popen, deadline: float) -> bool:
        """Until ``count`` temporaries have appeared (True) or the process ended or time ran out (False)."""
        while len(self.seen) < count:
            if proc.poll() is not None or time.time() > deadline:
                self.drain()
                return len(self.seen) >= count
            if select.select([self.fd], [], [], 0.05)[0]:
                self.drain()
        return True

    def drain(self) -> None:
        """Read every queued event (``struct inotify_event``: wd, mask, cookie, len, name)."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(data):
                wd, _mask, _cookie, size = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + size].rstrip(b"\0")
                pos += 16 + size
                if wd in self.dirs and name:
                    self._found(self.dirs[wd] / os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, int]]:
    """The uninterrupted run, its outputs' digests, and how many temporaries each stage created."""
    ws = tmp_path_factory.mktemp("reference")
    os.symlink(REPO / "workflow", ws / "workflow")
    shutil.copytree(REPO / "data/groups", ws / "data/groups")
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    temps = {}
    for name in ORDER:
        watch = TempWatch(ws)
        proc = start(ws, name)
        watch.wait(float("inf"), proc, time.time() + 600)  # every temporary, until the stage ends
        temps[name] = len(watch.seen)
        watch.close()
        assert proc.wait() == 0, f"{name}: {printed(proc)[-2000:]}"
    assert not (ws / "models/cnn/checkpoint.pt").exists()
    return ws, snapshot(ws), temps


def copy_of(reference, dest: Path) -> Path:
    shutil.copytree(reference[0], dest, symlinks=True)
    return dest


def start(ws: Path, name: str) -> subprocess.Popen:
    """The stage in a session of its own; what it prints goes to ``proc.log`` (a file: a pipe nobody reads
    while the test waits for an event would fill and stall the stage)."""
    argv, _ = stage(name)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=ws, env=ENV, stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)
    proc.log = log
    return proc


def printed(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL the stage's whole process group; True when it was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.log.close()
    return alive


@pytest.mark.parametrize("name", KILLED)
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_outputs(reference, tmp_path, name):
    _, ref, temps = reference
    _, outs = stage(name)
    assert temps[name] >= 1, f"{name}: the reference run created no temporary file to time a kill by"
    rng = random.Random(f"hcd-kill-{name}")
    landed, moments = 0, []
    for k in range(KILLS_PER_STAGE):
        ws = copy_of(reference, tmp_path / f"kill{k}")
        remove(ws, outs)
        nth, delay = rng.randint(1, temps[name]), rng.uniform(0.0, 0.05)
        watch = TempWatch(ws)
        proc = start(ws, name)
        assert watch.wait(nth, proc, time.time() + 600), f"{name}: the stage ended having created {len(watch.seen)} temporaries, not {nth}"
        watch.close()
        time.sleep(delay)
        hit = kill9(proc)
        landed += hit
        when = f"{delay * 1000:.0f} ms after temporary {nth} of {temps[name]} ({Path(watch.seen[nth - 1]).name})"
        moments.append(when)
        for f in output_files(ws, outs):  # whatever the kill left is complete, never half-written
            assert snapshot(ws).get(f) == ref[f], f"{name}: {f} left incomplete by a kill {when}"
        rerun = run_stage(ws, name)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert snapshot(ws) == ref, f"{name}: rerun after a kill {when} differs from the uninterrupted run"
        assert temporaries(ws) == []
        shutil.rmtree(ws)
    assert landed >= 1, f"{name}: every kill came after the stage had finished; nothing was tested"
    print(f"SIGKILL {name}: {landed} of {KILLS_PER_STAGE} kills landed mid-run ({'; '.join(moments)}); every rerun byte-identical")


def test_training_killed_after_a_checkpoint_resumes_and_matches(reference, tmp_path):
    _, ref, _ = reference
    ws = copy_of(reference, tmp_path / "ws")
    _, outs = stage("train@cnn")
    remove(ws, outs)
    ckpt = ws / "models/cnn/checkpoint.pt"
    proc = start(ws, "train@cnn")
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint appeared before training ended"
    time.sleep(random.Random(7).uniform(0.0, 0.5))  # somewhere in the next epoch
    assert kill9(proc), "training finished before the kill"
    rerun = run_stage(ws, "train@cnn")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming after epoch" in rerun.stderr
    assert snapshot(ws) == ref and temporaries(ws) == [] and not ckpt.exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("name", KILLED)
def test_disk_full_gives_one_line_and_keeps_the_previous_outputs(reference, tmp_path, name):
    _, ref, _ = reference
    ws = copy_of(reference, tmp_path / "ws")
    if name == "train@cnn":
        (ws / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "lr": 0.001}, sort_keys=False))  # new weights would replace the old
    argv, outs = stage(name)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ws, env=ENV, capture_output=True, text=True, preexec_fn=_limit_file_size(64))
    err = proc.stderr.strip().splitlines()[-1]  # progress lines may come first
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith(f"hcd {name.split('@')[0]}: error: ") and "File too large" in err, err
    assert any(o in err for o in outs) or "dvclive" in err, f"the message names no output: {err}"
    print(f"RLIMIT_FSIZE {name}: {err}")  # shown by pytest -rP: the closing note's table
    assert snapshot(ws) == ref, "previous outputs changed"
    assert temporaries(ws) == []


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a private namespace here")
@pytest.mark.parametrize("name, spare_kb", [("scan", 256), ("train@cnn", 0), ("predict@cnn", 0), ("metrics", 0)])
def test_real_enospc_on_a_small_tmpfs(reference, tmp_path, name, spare_kb):
    """The workspace on a tmpfs with almost no room to spare: a real ENOSPC (scan checks the space first)."""
    ws = copy_of(reference, tmp_path / "ws")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv, outs = stage(name)
    script = (
        f"mount -t tmpfs -o size=512m tmpfs {mnt} && cp -a {ws}/. {mnt}/ && "
        f"used=$(du -sk {mnt} | cut -f1) && mount -o remount,size=$((used + {spare_kb}))k {mnt} && "
        f"cd {mnt} && {shlex.quote(sys.executable)} {shlex.join(argv[1:])}; rc=$?; "
        f"find . -name '*.tmp-*' | sed 's/^/TEMP /'; "
        f"find {' '.join(o for o in outs)} -type f -exec sha256sum {{}} +; exit $rc"
    )
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=ENV, capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert err.startswith(f"hcd {name.split('@')[0]}: error: ") and ("No space left on device" in err or "not enough disk space" in err), proc.stderr
    assert "TEMP" not in proc.stdout
    print(f"ENOSPC {name}: {err}")
    _, ref, _ = reference
    seen = dict(reversed(line.split()) for line in proc.stdout.splitlines())
    assert seen == {f: ref[f] for f in output_files(ws, outs)}, "previous outputs changed"
