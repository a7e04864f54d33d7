"""The stage table: one definition of the pipeline for DVC and Snakemake.

Each :class:`Stage` holds the command line, inputs, outputs and the exact
params keys the stage reads. ``dvc.yaml`` is rendered from this table
(``hcd pipeline write``; a test fails when the committed file differs), and
the ``Snakefile`` builds its rules from the same objects at parse time — so the
two engines cannot disagree on a command, an input, an output or a param.

Code dependencies name the stage's own modules (not the shared plumbing in
``hcd/io.py``, ``hcd/params.py``, ``hcd/cli.py``), so adding a params key for a
later stage does not rerun the data stages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hcd.errors import HcdError
from hcd.params import Params, lookup

RAW = "data/raw/hcd.zip"
PACKED = "data/packed"
SCAN = "data/scan"
SPLIT = "data/split"
STATS = "data/stats/stats.json"
GROUPS_DIR = "data/groups"
METRICS = "metrics"  # small JSON metrics, kept in git so `dvc metrics diff` compares commits

HEADER = """\
# Generated from hcd/pipeline.py by `hcd pipeline write` — do not edit by hand.
# The Snakefile is built from the same table; tests/test_pipeline.py fails when they disagree.
"""


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # workflow/scripts/<name>.py
    args: tuple[str, ...]
    deps: tuple[str, ...]  # data and code inputs besides the script
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics (kept in git, not the cache)
    params: tuple[str, ...] = ()  # params.yaml keys read (a section or a dotted key)
    resources: dict[str, int] = field(default_factory=dict)  # Snakemake resources (gpu=1)

    @property
    def cmd(self) -> str:
        return " ".join(("python", self.script, *self.args))

    @property
    def inputs(self) -> list[str]:
        return [self.script, *self.deps]

    @property
    def outputs(self) -> list[str]:
        return [*self.outs, *self.metrics]

    def to_dvc(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cmd": self.cmd, "deps": self.inputs}
        if self.params:
            d["params"] = list(self.params)
        if self.outs:
            d["outs"] = list(self.outs)
        if self.metrics:
            d["metrics"] = [{m: {"cache": False}} for m in self.metrics]
        return d


STAGES: tuple[Stage, ...] = (
    Stage(
        name="download",
        script="workflow/scripts/download.py",
        args=("--out", RAW),
        deps=("hcd/download.py", "hcd/synth.py", "hcd/source.py", "hcd/tiff.py"),
        outs=(RAW,),
        params=("data",),
    ),
    Stage(
        name="scan",
        script="workflow/scripts/scan.py",
        args=(RAW, "--report", f"{SCAN}/report.csv", "--summary", f"{METRICS}/scan.json", "--packed-dir", PACKED),
        deps=(RAW, "hcd/scan.py", "hcd/source.py", "hcd/tiff.py", "hcd/packed.py"),
        outs=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{PACKED}/test_x.npy", f"{PACKED}/test_index.csv", f"{SCAN}/report.csv"),
        metrics=(f"{METRICS}/scan.json",),
        params=("scan",),
    ),
    Stage(
        name="split",
        script="workflow/scripts/split.py",
        args=(f"{PACKED}/train_index.csv", "--out", f"{SPLIT}/split.csv", "--balance", f"{METRICS}/split.json"),
        deps=(f"{PACKED}/train_index.csv", GROUPS_DIR, "hcd/split.py"),
        outs=(f"{SPLIT}/split.csv",),
        metrics=(f"{METRICS}/split.json",),
        params=("split",),
    ),
    Stage(
        name="stats",
        script="workflow/scripts/stats.py",
        args=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", "--out", STATS),
        deps=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", "hcd/stats.py", "hcd/packed.py"),
        outs=(STATS,),
    ),
)


def final_outputs(stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """Every output of every stage: the Snakemake ``all`` target."""
    return [o for s in stages for o in s.outputs]


def snakemake_params(params: Params, stage: Stage) -> dict[str, Any]:
    """The values of the keys a stage reads, as Snakemake ``params:`` (rerun when they change)."""
    return {key.replace(".", "__"): lookup(params, key) for key in stage.params}


def render_dvc_yaml(stages: tuple[Stage, ...] = STAGES) -> str:
    body = {"stages": {s.name: s.to_dvc() for s in stages}}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd pipeline", description="write or check dvc.yaml from the stage table")
    ap.add_argument("action", choices=["write", "check", "show"])
    ap.add_argument("--file", default="dvc.yaml")
    args = ap.parse_args(argv)
    text = render_dvc_yaml()
    path = Path(args.file)
    if args.action == "show":
        sys.stdout.write(text)
    elif args.action == "write":
        from hcd.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    elif not path.exists() or path.read_text() != text:
        raise HcdError(f"{path}: out of date with hcd/pipeline.py — run `hcd pipeline write`")
