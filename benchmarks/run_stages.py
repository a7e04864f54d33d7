"""Run pipeline stages one by one, each timed, and merge the times into a JSON report (gpu_check.sh's step 3).

Usage (in a checkout whose params.yaml is set up):
    python benchmarks/run_stages.py REPORT only STAGE...     # the named stages, in the table's order
    python benchmarks/run_stages.py REPORT except STAGE...   # every other stage

Each stage runs as the stage table writes it (``hcd.pipeline.table``), per backbone where it is
per-backbone, with no shell. A stage gets 400 s, or what is left before ``HCD_GPU_CHECK_DEADLINE``
(epoch seconds) if that comes first; the first stage that fails or runs out of time ends the run.
The report is rewritten after every stage, so a run killed from outside keeps the stages that
finished: ``stage_seconds``, ``import_seconds`` (each stage's Python imports, from ``python -X importtime``:
what a stage spends before its first line of work), ``runs`` (each call's state: running, ok or failed),
``completed`` (every run ended ok) and, once ``metrics`` has run, the run's out-of-fold AUCs (``oof_auc``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcd.atomic import write_json  # noqa: E402
from hcd.pipeline.params import load_params  # noqa: E402
from hcd.pipeline.table import ITEM, STAGES  # noqa: E402

STAGE_LIMIT_S = 400.0


def save(report: Path, run: str, times: dict[str, float], imports: dict[str, float], state: str, metrics_ran: bool) -> None:
    """Merge this run's times and state into the report, atomically; the AUCs once ``metrics`` has just run."""
    out = json.loads(report.read_text()) if report.exists() else {}
    out.setdefault("stage_seconds", {}).update(times)
    out.setdefault("import_seconds", {}).update(imports)
    out["total_seconds"] = round(sum(out["stage_seconds"].values()), 1)
    runs = out.setdefault("runs", {})
    runs[run] = state  # a run killed from outside stays "running"
    out["completed"] = all(v == "ok" for v in runs.values())
    if metrics_ran:  # this run's metrics, not the copied checkout's
        m = json.loads(Path("metrics/metrics.json").read_text())
        out["oof_auc"] = {k: v["auc"] for k, v in m.items() if isinstance(v, dict) and "auc" in v}
    write_json(report, out)


def jobs(mode: str, names: set[str]) -> list[tuple[str, list[str]]]:
    """(report key, argv) of every stage to run, in the table's order."""
    backbones = load_params("params.yaml").backbones
    out = []
    for s in STAGES:
        if (s.name in names) != (mode == "only"):
            continue
        for b in backbones if s.per_backbone else [None]:
            argv = shlex.split(s.cmd.replace(ITEM, b) if b else s.cmd)
            out.append((f"{s.name}@{b}" if b else s.name, [sys.executable, "-X", "importtime", *argv[1:]]))  # argv[0] is "python"
    return out


def import_seconds(stderr: str) -> tuple[float, dict[str, float], str]:
    """From ``-X importtime``'s lines: the seconds of the top-level imports, the three modules that took longest
    by themselves (where a slow start comes from), and stderr without those lines."""
    total, own, rest = 0.0, {}, []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            rest.append(line)
            continue
        head, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():  # the header
            continue
        own[name.strip()] = int(head.rsplit(":", 1)[1]) / 1e6
        if not name[1:].startswith(" "):  # a top-level import (nested ones are indented)
            total += int(cumulative) / 1e6
    slowest = {k: round(v, 2) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:3]}
    return round(total, 2), slowest, "\n".join(rest)


def run_one(key: str, argv: list[str], deadline: float) -> tuple[float, float, bool]:
    """Run one stage; (seconds, import seconds, ended ok). Prints one line, and the stage's error output when it fails."""
    limit = max(1.0, min(STAGE_LIMIT_S, deadline - time.time()))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        seconds = round(time.perf_counter() - t0, 1)
        imports, _, err = import_seconds(exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or "")
        print(f"{key}: stopped after {seconds} s ({limit:.0f} s limit)", err[-2000:], flush=True)
        return seconds, imports, False
    seconds = round(time.perf_counter() - t0, 1)
    imports, slowest, err = import_seconds(proc.stderr)
    print(f"{key}: {seconds} s ({imports} s of imports; slowest by themselves: {slowest})", err.strip().splitlines()[-1:], flush=True)
    if proc.returncode:
        print(err[-2000:], flush=True)
    return seconds, imports, proc.returncode == 0


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] not in ("only", "except"):
        sys.exit(__doc__.split("\n\n")[1])
    report, mode, names = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3:])
    run = f"{mode} {' '.join(sorted(names))}"
    deadline = float(os.environ.get("HCD_GPU_CHECK_DEADLINE", time.time() + 1e9))
    times: dict[str, float] = {}
    imports: dict[str, float] = {}
    save(report, run, times, imports, "running", False)
    for key, argv in jobs(mode, names):
        times[key], imports[key], ok = run_one(key, argv, deadline)
        if not ok:
            save(report, run, times, imports, "failed", False)
            return 1
        save(report, run, times, imports, "running", key == "metrics")
    save(report, run, times, imports, "ok", False)  # the AUCs were saved after metrics
    return 0


if __name__ == "__main__":
    sys.exit(main())
