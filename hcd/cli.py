"""The hcd command: every stage by name, plus pipeline tools.

Usage ("hcd COMMAND --help" for the options of a command):

    hcd check | download | scan | split | stats | train | predict | explain | ensemble | metrics | report | export ...
                                               one stage, as the engines run it
    hcd infer BUNDLE INPUT... --out CSV        predict new patches (folders, zips, .tif files)
                                               from the export bundle (export/)
    hcd submit [-m NOTE] [--dry-run]           validate results/submission.csv and upload it to Kaggle
    hcd lr-find BACKBONE | --all               learning-rate range test: suggested lr, plot in lr-find/
    hcd push | pull [-r REMOTE]                share the cached outputs through a DVC remote; pull also
                                               makes Snakemake take the pulled files as up to date
    hcd score PREDICTIONS LABELS               AUC (95 % CI) of a submission (id,label) or a
                                               backbone's predictions (id,prob) against id,label
    hcd summary                                the last run: validation AUC (95 % CI) per backbone and
                                               ensemble, best epochs, where the submission is
    hcd params apply OVERLAY [--params FILE]   merge a configuration overlay into params.yaml
    hcd params flags OVERLAY [--params FILE]   the overlay as `dvc exp run -S` flags, validated
    hcd pipeline write|check|show              regenerate / verify / print dvc.yaml
    hcd pipeline prune [--dry-run]             remove the outputs of backbones dropped from backbones
    hcd demo-truth OUT_DIR [--params FILE]     the demo's test labels and slide groups

A stage that fails on input the user can fix prints one line, for example
"hcd scan: error: data/raw/hcd.zip: no train_labels.csv at the top level", and
exits 2; nothing it had produced before is touched.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from hcd.errors import HcdError
from hcd.stages import GPU_STAGES
from hcd.stages import NAMES as STAGE_NAMES

STAGE_MODULES = {name: f"hcd.stages.{name}" for name in STAGE_NAMES}
TOOLS = {"infer": "hcd.tools.infer", "submit": "hcd.tools.submit", "lr-find": "hcd.tools.lrfind"}  # commands around the pipeline
REMOTE = ("push", "pull")  # hcd.tools.remote: the action is its first argument


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Snakemake and `kill` send): unwinds like Ctrl-C, so temporaries are removed."""


_STAGE_PID: int | None = None  # the process whose SIGTERM unwinds the stage (run_stage sets it)


def _on_sigterm(signum: int, frame: object) -> None:
    """Unwind the stage. A process forked from it (the demo generator's pool, the scan's executor) inherits
    this handler, but a pool that terminates its workers SIGTERMs them and expects them gone: raised there
    at the wrong moment, the exception left a task-queue lock taken and the stage waiting forever (seen in
    the test suite: the parent in Pool.terminate's join, a worker in SemLock.__enter__). A forked child ends
    as SIGTERM's default would; it holds no temporaries of the stage's. (The generator's pool is now
    terminated only on failure: see hcd.data.synth.write_archive.)"""
    if os.getpid() != _STAGE_PID:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def run_stage(fn: Callable[[list[str] | None], None], name: str, argv: list[str] | None = None) -> None:
    """Call a stage's ``main`` and turn user-fixable failures into one line and exit code 2.

    SIGTERM is handled like SIGINT: the stage unwinds, every temporary it was
    writing is removed and earlier outputs stay as they were (exit 143). Each
    start also sweeps temporaries left by killed processes (:func:`hcd.atomic.sweep_dead_temps`),
    and a GPU stage claims a GPU no other job holds (:mod:`hcd.runtime.gpuslots`).
    """
    from hcd.atomic import public_name, replay_journals, sweep_dead_temps

    global _STAGE_PID
    if threading.current_thread() is threading.main_thread():
        _STAGE_PID = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        asked_help = bool({"-h", "--help"} & set(sys.argv[1:] if argv is None else argv))
        if name in STAGE_MODULES and not asked_help:  # help writes nothing
            from hcd.pipeline.runlock import claim

            claim(name)  # one runner (dvc or snakemake) per checkout at a time
            replay_journals()  # a commit killed among its renames is finished first...
            sweep_dead_temps()  # ...then temporaries of killed processes go
            if name in GPU_STAGES and "TORCHELASTIC_RUN_ID" not in os.environ:  # a torchrun rank uses what its launcher claimed
                from hcd.runtime import gpuslots

                needed = getattr(sys.modules.get(fn.__module__), "gpus_needed", lambda a: 1)(sys.argv[1:] if argv is None else argv)
                gpuslots.claim(needed, name)  # GPUs of its own when several jobs run at once; nothing with one GPU or none
        fn(argv)
    except HcdError as err:
        print(f"hcd {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # disk full, permissions, ...: name the output (not its hidden temporary), no traceback
        where = f"{public_name(err.filename)}: " if getattr(err, "filename", None) else ""
        print(f"hcd {name}: error: {where}{err.strerror or err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        print(f"hcd {name}: {'terminated (SIGTERM)' if term else 'interrupted'}; outputs left as they were", file=sys.stderr)
        raise SystemExit(143 if term else 130) from None


def _demo_truth(argv: list[str] | None) -> None:
    import argparse

    from hcd.data.synth import write_truth
    from hcd.pipeline.params import load_params

    ap = argparse.ArgumentParser(prog="hcd demo-truth", description="write the demo dataset's test labels (demo_test_labels.csv) and slide groups (demo_slides.csv)")
    ap.add_argument("out_dir", help="folder to write into, e.g. data/groups")
    ap.add_argument("--params", default="params.yaml", help="the params whose data.demo settings made the demo (default: params.yaml)")
    args = ap.parse_args(argv)
    write_truth(args.out_dir, load_params(args.params).data.demo)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd in STAGE_MODULES:
        run_stage(importlib.import_module(STAGE_MODULES[cmd]).main, cmd, rest)
    elif cmd == "score":
        from hcd.scoring import score_main

        run_stage(score_main, "score", rest)
    elif cmd == "params":
        from hcd.pipeline.overlays import main as overlay_main

        run_stage(overlay_main, "params", rest)
    elif cmd == "pipeline":
        from hcd.pipeline.table import main as pipeline_main

        run_stage(pipeline_main, "pipeline", rest)
    elif cmd == "summary":
        from hcd.summary import main as summary_main

        run_stage(summary_main, "summary", rest)
    elif cmd == "demo-truth":
        run_stage(_demo_truth, "demo-truth", rest)
    elif cmd in TOOLS:
        run_stage(importlib.import_module(TOOLS[cmd]).main, cmd, rest)
    elif cmd in REMOTE:
        from hcd.tools.remote import main as remote_main

        run_stage(remote_main, cmd, [cmd, *rest])
    else:
        print(f"hcd: unknown command {cmd!r} (try: hcd --help)", file=sys.stderr)
        raise SystemExit(2)
