"""The stage table: one definition of the pipeline for DVC and Snakemake.

Each :class:`Stage` holds the command line, inputs, outputs and the exact
params keys the stage reads. ``dvc.yaml`` is rendered from this table
(``hcd pipeline write``; a test fails when the committed file differs), and
the ``Snakefile``'s rules read the same objects — so the two engines cannot
disagree on a command, an input, an output or a param.

Per-backbone stages (``per_backbone=True``) use ``{item}`` in their command and
paths: DVC renders them as ``foreach: ${backbones}`` (``train@resnet18``),
Snakemake as a ``{backbone}`` wildcard. A stage that needs every backbone's
output (``gather``) depends on the enclosing folder in DVC (DVC orders it after
every stage writing inside) and on the expanded file list in Snakemake.

Code dependencies name the stage's own modules (not the shared plumbing in
``hcd/atomic.py``, ``hcd/pipeline/params.py``, ``hcd/cli.py``), so adding a params key for a
later stage does not rerun the data stages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from hcd.errors import HcdError
from hcd.pipeline.params import Params, lookup

PARAMS_FILE = "params.yaml"
CHECKED = "data/check/params.json"  # written by the check stage; every other stage depends on it
RAW = "data/raw/hcd.zip"
PACKED = "data/packed"
SCAN = "data/scan"
SPLIT = "data/split"
STATS = "data/stats/stats.json"
GROUPS_DIR = "data/groups"
METRICS = "metrics"  # small JSON metrics, kept in git so `dvc metrics diff` compares commits
PREDICTIONS = "predictions"
PLOTS = "plots"
ROC, PRC, CONFUSION = (f"{PLOTS}/{name}.json" for name in ("roc", "prc", "confusion"))  # the metrics stage's curves: top-level DVC plots
ENSEMBLE_VAL = "results/ensemble/val.csv"  # the ensemble's held-out predictions
ENSEMBLE_FIT = "results/ensemble/ensemble.json"  # its method and the stacker's weights (hcd infer, the export bundle)
SUBMISSION = "results/submission.csv"
EXPORT = "export"  # the ONNX bundle (hcd infer reads it)
REPORT = "report"  # figures for people (snakemake --report, dvc plots show)
REPORT_FIGURES = ("scan", "split", "training", "roc", "auc", "confusion")  # report/<name>.png: the name picks what hcd.stages.report draws
EXPORT_PARAMS = ("seed", "lr", "backbones", "data", "scan", "split", "train", "models", "predict", "ensemble")  # recorded in its manifest
ITEM = "{item}"  # the backbone, in per-backbone stages
LOGS = "logs"  # Snakemake's per-job log files (git- and DVC-ignored)
SNAKEMAKE_LOG_SUFFIX = " 2>&1 | tee {log}"  # the stage's output to the terminal and to its log (bash runs with pipefail)

HEADER = """\
# Generated from hcd/pipeline/table.py by `hcd pipeline write` — do not edit by hand.
# The Snakefile is built from the same table; tests/test_pipeline.py fails when they disagree.
"""


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # workflow/scripts/<name>.py
    args: tuple[str, ...]
    deps: tuple[str, ...]  # data and code inputs besides the script
    outs: tuple[str, ...] = ()  # cached by DVC
    metrics: tuple[str, ...] = ()  # DVC metrics: kept in git, not the cache
    uncached: tuple[str, ...] = ()  # other outputs kept in git (top-level metrics and plots)
    plots: tuple[tuple[str, dict[str, Any]], ...] = ()  # stage-level DVC plots (uncached)
    params: tuple[str, ...] = ()  # params.yaml keys read (a section or a dotted key)
    per_backbone: bool = False  # one stage per entry of `backbones`
    gather: tuple[str, ...] = ()  # inputs written per backbone: "predictions/{item}/val.csv"
    dirs: tuple[str, ...] = ()  # outputs that are folders
    threads: str | int = 1  # Snakemake threads ("all": the whole machine, one job at a time)
    resources: dict[str, int] = field(default_factory=dict)  # Snakemake resources (gpu=1)
    memory: tuple[int, float] = (1000, 0.0)  # host memory estimate: MB, plus MB per MB of input (see snakemake_mem_mb)
    report: tuple[tuple[str, str], ...] = ()  # (output, category): on `snakemake --report`'s page, captioned by workflow/report/<name>.rst

    @property
    def cmd(self) -> str:
        return " ".join(("python", self.script, *self.args))

    @property
    def log(self) -> str:
        """Where Snakemake keeps the stage's output (DVC prints it only)."""
        return f"{LOGS}/{self.name}/{ITEM}.log" if self.per_backbone else f"{LOGS}/{self.name}.log"

    @property
    def inputs(self) -> list[str]:
        return [self.script, *self.deps]

    @property
    def outputs(self) -> list[str]:
        return [*self.outs, *self.metrics, *self.uncached, *(p for p, _ in self.plots)]

    def gather_dirs(self) -> list[str]:
        """The folders DVC depends on for the gathered inputs."""
        return sorted({g.split("/" + ITEM)[0] for g in self.gather})

    def to_dvc(self) -> dict[str, Any]:
        sub = (lambda s: s.replace(ITEM, "${item}")) if self.per_backbone else (lambda s: s)
        d: dict[str, Any] = {"cmd": sub(self.cmd), "deps": [sub(x) for x in [*self.inputs, *self.gather_dirs()]]}
        if self.params:
            d["params"] = [sub(k) for k in self.params]
        outs: list[Any] = [sub(o) for o in self.outs] + [{sub(o): {"cache": False}} for o in self.uncached]
        if outs:
            d["outs"] = outs
        if self.metrics:
            d["metrics"] = [{sub(m): {"cache": False}} for m in self.metrics]
        if self.plots:
            d["plots"] = [{sub(p): {"cache": False, **{k: sub(v) if isinstance(v, str) else v for k, v in props.items()}}} for p, props in self.plots]
        if self.per_backbone:
            return {"foreach": "${backbones}", "do": d}
        return d


# The modules whose code decides a model's weights: the train stage depends on them, and a
# training checkpoint's run key (hcd.checkpoint) hashes them.
# Inference code (model loading, preprocessing, TTA) is shared by predict and train's validation pass.
INFER_CODE = ("model/factory", "model/weights", "model/meta", "model/inference", "data/augment", "data/batches", "data/packed", "runtime/device", "runtime/seeding", "env")
TRAIN_CODE = ("stages/train", "model/checkpoint", "runtime/loop", "runtime/optim", "runtime/distributed", "digests", *INFER_CODE)
# Everything that decides an export bundle's numbers: the export stage depends on it and its
# manifest records each file's git blob id (hcd.digests), so the record is itself reproducible.
BUNDLE_CODE = (*TRAIN_CODE, "stages/predict", "stages/ensemble", "model/combine", "stages/export", "model/bundle")


def per_backbone(pattern: str, backbones: list[str]) -> dict[str, Path]:
    """A gathering stage's ``--val predictions/{item}/val.csv``: each backbone's own path."""
    return {b: Path(pattern.replace(ITEM, b)) for b in backbones}


PACKED_FILES = ("train_x.npy", "train_index.csv", "test_x.npy", "test_index.csv")  # what scan packs


def packed_args(folder: str | Path) -> list[str]:
    """The scan's packed outputs as its arguments, ``--train-x <folder>/train_x.npy`` and so on."""
    return [w for name in PACKED_FILES for w in (f"--{name.split('.')[0].replace('_', '-')}", str(Path(folder) / name))]


def code_files(*modules: str) -> tuple[str, ...]:
    """Module names ("stages/train") as the repository paths DVC tracks ("hcd/stages/train.py")."""
    return tuple(f"hcd/{m}.py" for m in modules)


def _gated(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Every stage after ``check`` depends on its marker: a bad params value stops the run before any of them."""
    return tuple(s if s.name == "check" else replace(s, deps=(CHECKED, *s.deps)) for s in stages)


STAGES: tuple[Stage, ...] = _gated((
    Stage(
        name="check",
        script="workflow/scripts/check.py",
        args=(PARAMS_FILE, "--out", CHECKED),
        deps=(PARAMS_FILE, *code_files("stages/check", "pipeline/params", "pipeline/prune", "errors")),
        outs=(CHECKED,),
    ),
    Stage(
        name="download",
        script="workflow/scripts/download.py",
        args=("--out", RAW),
        deps=code_files("stages/download", "data/synth", "data/source", "data/tiff", "env", "redact", "kaggleapi"),
        outs=(RAW,),
        params=("data",),

        threads="all",  # the demo renders in worker processes
        memory=(2000, 0.0),  # the demo renders in worker processes; a Kaggle download streams to disk
    ),
    Stage(
        name="scan",
        script="workflow/scripts/scan.py",
        args=(RAW, "--report", f"{SCAN}/report.csv", "--summary", f"{METRICS}/scan.json", *packed_args(PACKED)),
        deps=(RAW, *code_files("stages/scan", "data/source", "data/tiff", "data/packed", "data/tables", "env")),
        outs=(*(f"{PACKED}/{name}" for name in PACKED_FILES), f"{SCAN}/report.csv"),
        uncached=(f"{METRICS}/scan.json",),  # in git, beside the metrics; not a DVC metric (dozens of counts)
        params=("scan",),

        threads="all",  # decodes in worker processes (HCD_WORKERS)
        memory=(2000, 0.1),  # decode workers; the packed arrays are written through memory maps
    ),
    Stage(
        name="split",
        script="workflow/scripts/split.py",
        args=(f"{PACKED}/train_index.csv", "--out", f"{SPLIT}/split.csv", "--balance", f"{METRICS}/split.json"),
        deps=(f"{PACKED}/train_index.csv", GROUPS_DIR, *code_files("stages/split", "data/packed")),
        outs=(f"{SPLIT}/split.csv",),
        uncached=(f"{METRICS}/split.json",),
        params=("split",),
        memory=(1000, 0.05),  # the index tables
    ),
    Stage(
        name="stats",
        script="workflow/scripts/stats.py",
        args=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", "--out", STATS),
        deps=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", *code_files("stages/stats", "data/packed")),
        outs=(STATS,),
        memory=(1500, 0.05),  # reads the packed arrays in chunks
    ),
    Stage(
        name="train",
        script="workflow/scripts/train.py",
        args=(ITEM, "--packed", f"{PACKED}/train_x.npy", "--index", f"{PACKED}/train_index.csv", "--split", f"{SPLIT}/split.csv", "--stats", STATS, "--out-dir", f"models/{ITEM}", "--live-dir", f"dvclive/{ITEM}"),
        deps=(f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", STATS, *code_files(*TRAIN_CODE)),
        outs=(f"models/{ITEM}/model.safetensors", f"models/{ITEM}/model.json"),
        metrics=(f"dvclive/{ITEM}/metrics.json",),
        uncached=(f"dvclive/{ITEM}/plots/metrics",),  # drawn by `dvc plots show` as dvclive/<b>/dvc.yaml says (written by the run: it knows the folds)
        params=("seed", "lr", "train", f"models.{ITEM}"),  # its own entry only: tuning one backbone retrains no other
        per_backbone=True,
        dirs=(f"dvclive/{ITEM}/plots/metrics",),
        threads="all",
        resources={"gpu": 1},
        memory=(4000, 1.0),  # the selected rows in memory (below HCD_IN_MEMORY_BYTES), the model, a batch
    ),
    Stage(
        name="predict",
        script="workflow/scripts/predict.py",
        args=(ITEM, "--model-dir", f"models/{ITEM}", "--train-x", f"{PACKED}/train_x.npy", "--train-index", f"{PACKED}/train_index.csv", "--split", f"{SPLIT}/split.csv", "--test-x", f"{PACKED}/test_x.npy", "--test-index", f"{PACKED}/test_index.csv", "--val-out", f"{PREDICTIONS}/{ITEM}/val.csv", "--test-out", f"{PREDICTIONS}/{ITEM}/test.csv"),
        deps=(f"models/{ITEM}/model.safetensors", f"models/{ITEM}/model.json", f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{PACKED}/test_x.npy", f"{PACKED}/test_index.csv", f"{SPLIT}/split.csv", *code_files("stages/predict", "model/combine", *INFER_CODE)),
        outs=(f"{PREDICTIONS}/{ITEM}/val.csv", f"{PREDICTIONS}/{ITEM}/test.csv"),
        params=("predict",),
        per_backbone=True,
        threads="all",
        resources={"gpu": 1},
        memory=(4000, 1.0),  # as train
    ),
    Stage(
        name="explain",
        script="workflow/scripts/explain.py",
        args=(ITEM, "--model-dir", f"models/{ITEM}", "--train-x", f"{PACKED}/train_x.npy", "--train-index", f"{PACKED}/train_index.csv", "--split", f"{SPLIT}/split.csv", "--predictions", f"{PREDICTIONS}/{ITEM}/val.csv", "--grids", f"explain/{ITEM}/grids", "--tiles", f"explain/{ITEM}/tiles.csv"),
        deps=(f"models/{ITEM}/model.safetensors", f"models/{ITEM}/model.json", f"{PACKED}/train_x.npy", f"{PACKED}/train_index.csv", f"{SPLIT}/split.csv", f"{PREDICTIONS}/{ITEM}/val.csv", *code_files("stages/explain", "model/cam", *INFER_CODE)),
        outs=(f"explain/{ITEM}/tiles.csv",),
        plots=((f"explain/{ITEM}/grids", {"cache": True}),),  # images: DVC shows them with `dvc plots show`
        params=("explain",),
        per_backbone=True,
        dirs=(f"explain/{ITEM}/grids",),
        report=((f"explain/{ITEM}/grids", "Grad-CAM"),),
        resources={"gpu": 1},
        memory=(3000, 0.5),  # the validation rows it draws tiles from
    ),
    Stage(
        name="ensemble",
        script="workflow/scripts/ensemble.py",
        args=("--val", f"{PREDICTIONS}/{ITEM}/val.csv", "--test", f"{PREDICTIONS}/{ITEM}/test.csv", "--test-index", f"{PACKED}/test_index.csv", "--val-out", ENSEMBLE_VAL, "--fit-out", ENSEMBLE_FIT, "--submission", SUBMISSION),
        deps=(f"{PACKED}/test_index.csv", *code_files("stages/ensemble", "model/combine")),
        gather=(f"{PREDICTIONS}/{ITEM}/val.csv", f"{PREDICTIONS}/{ITEM}/test.csv"),
        outs=(ENSEMBLE_VAL, ENSEMBLE_FIT, SUBMISSION),
        params=("backbones", "ensemble", "seed"),
        memory=(1000, 2.0),  # prediction tables
    ),
    Stage(
        name="metrics",
        script="workflow/scripts/metrics.py",
        args=("--val", f"{PREDICTIONS}/{ITEM}/val.csv", "--test", f"{PREDICTIONS}/{ITEM}/test.csv", "--ensemble", ENSEMBLE_VAL, "--submission", SUBMISSION, "--out", f"{METRICS}/metrics.json", "--summary", f"{METRICS}/summary.json", "--roc", ROC, "--prc", PRC, "--confusion", CONFUSION),
        deps=(ENSEMBLE_VAL, SUBMISSION, *code_files("stages/metrics", "scoring", "data/tables", "summary", "data/synth", "data/tiff")),
        gather=(f"{PREDICTIONS}/{ITEM}/val.csv", f"{PREDICTIONS}/{ITEM}/test.csv"),
        outs=(CONFUSION,),  # one row per scored patch (the template counts them): 11.7 MB for Kaggle's 220,025 out-of-fold predictions, too big for git
        uncached=(f"{METRICS}/metrics.json", f"{METRICS}/summary.json", ROC, PRC),  # ROC and PRC thinned: 0.2 MB each at that size
        params=("backbones", "metrics", "data.source", "data.demo"),  # the demo's test labels come from its params
        memory=(1000, 2.0),  # prediction tables, bootstrap
    ),
    Stage(
        name="report",
        script="workflow/scripts/report.py",
        args=("--scan", f"{METRICS}/scan.json", "--scan-report", f"{SCAN}/report.csv", "--raw", RAW, "--split", f"{METRICS}/split.json", "--model-json", f"models/{ITEM}/model.json", "--metrics", f"{METRICS}/metrics.json", "--roc", ROC, "--prc", PRC, "--ensemble", ENSEMBLE_VAL, "--figures", *(f"{REPORT}/{f}.png" for f in REPORT_FIGURES)),
        deps=(f"{METRICS}/scan.json", f"{SCAN}/report.csv", RAW, f"{METRICS}/split.json", f"{METRICS}/metrics.json", ROC, PRC, ENSEMBLE_VAL, *code_files("stages/report", "model/meta", "data/source", "data/tiff")),
        gather=(f"models/{ITEM}/model.json",),
        plots=tuple((f"{REPORT}/{f}.png", {"cache": True}) for f in REPORT_FIGURES),  # images: `dvc plots show` puts them on its page
        params=("backbones",),
        report=tuple((f"{REPORT}/{f}.png", cat) for f, cat in zip(REPORT_FIGURES, ("Data", "Data", "Training", "Results", "Results", "Results"))),
        memory=(1500, 0.0),  # matplotlib figures
    ),
    Stage(
        name="export",
        script="workflow/scripts/export.py",
        args=("--model-dir", f"models/{ITEM}", "--ensemble", ENSEMBLE_FIT, "--out", EXPORT),
        deps=(ENSEMBLE_FIT, *code_files(*BUNDLE_CODE)),
        gather=(f"models/{ITEM}/model.safetensors", f"models/{ITEM}/model.json"),
        outs=(EXPORT,),
        params=EXPORT_PARAMS,
        dirs=(EXPORT,),
        memory=(3000, 0.0),  # each fold model traced to ONNX in turn
    ),
))

# Top level of dvc.yaml: what `dvc metrics diff`, `dvc plots diff` and `dvc exp show` read.
# Top-level DVC metrics: only what a user compares between experiments (`dvc metrics diff`, `dvc exp show`):
# AUC and its 95 % interval per backbone and for the ensemble. The details stay in metrics/metrics.json
# (in git, an ordinary output); best epochs are in each backbone's dvclive metrics.
TOP_METRICS = (f"{METRICS}/summary.json",)
TOP_PLOTS = (
    # one chart each, a line per backbone and the ensemble (the template colours by the records' `model`)
    {ROC: {"x": "fpr", "y": "tpr", "template": "workflow/plots/lines_by_model.json", "title": "ROC, held-out patches", "x_label": "false positive rate", "y_label": "true positive rate"}},
    {PRC: {"x": "recall", "y": "precision", "template": "workflow/plots/lines_by_model.json", "title": "Precision-recall, held-out patches", "x_label": "recall", "y_label": "precision"}},
    {CONFUSION: {"x": "actual", "y": "predicted", "template": "confusion", "title": "Confusion at 0.5 (ensemble)"}},
)


def report_annotations(stage: Stage) -> dict[str, dict[str, Any]]:
    """Snakemake ``report()`` arguments of the stage's outputs that go on ``snakemake --report``'s page:
    caption ``workflow/report/<figure>.rst`` (a folder of images: ``<stage>.rst``, one entry per image,
    under the backbone as subcategory) and category."""
    notes: dict[str, dict[str, Any]] = {}
    for out, category in stage.report:
        if out in stage.dirs:
            notes[out] = {"caption": f"workflow/report/{stage.name}.rst", "category": category, "patterns": ["{name}.png"], "subcategory": "{backbone}"}
        else:
            notes[out] = {"caption": f"workflow/report/{Path(out).stem}.rst", "category": category}
    return notes


def final_outputs(backbones: list[str], stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """Every stage's outputs, per-backbone ones for each backbone: the Snakemake ``all`` target
    (a per-backbone stage nothing else reads, such as explain, runs because ``all`` asks for it)."""
    return [o.replace(ITEM, b) if s.per_backbone else o for s in stages for o in s.outputs for b in (backbones if s.per_backbone else [None])]


def snakemake_params(params: Params, stage: Stage) -> dict[str, Any]:
    """The values of the keys a stage reads, as Snakemake ``params:`` (rerun when they change).
    A per-backbone key (``models.{item}``) is a function of the job's backbone, so each job sees its own entry."""
    out: dict[str, Any] = {}
    for key in stage.params:
        name = key.replace(ITEM, "item").replace(".", "__")
        if ITEM in key:
            out[name] = lambda wildcards, key=key: lookup(params, key.replace(ITEM, wildcards.backbone))
        else:
            out[name] = lookup(params, key)
    return out


MEMORY_INPUT_CAP_MB = 4096  # inputs count up to HCD_IN_MEMORY_BYTES' default: above it hcd memory-maps instead of loading


def snakemake_mem_mb(stage: Stage):
    """The ``mem_mb`` a job asks for (SLURM's --mem, or Snakemake's own ``--resources mem_mb=N``), sized by its inputs:
    base + factor x min(input MB, 4096), doubled on each retry (``--retries``: an out-of-memory kill asks for more)."""
    base, per_input = stage.memory

    def mem_mb(wildcards, input, attempt: int = 1) -> int:  # noqa: A002 - Snakemake passes the job's inputs by this name
        return int((base + per_input * min(input.size_mb, MEMORY_INPUT_CAP_MB)) * attempt)

    return mem_mb


def wildcard(path: str) -> str:
    """A per-backbone path as a Snakemake pattern."""
    return path.replace(ITEM, "{backbone}")


def snakemake_command(stage: Stage):
    """The stage's command for one job, as a function of its wildcards: Snakemake would expand a params
    *string* itself, and a gathering stage's command holds ``{item}`` for the stage to fill in per backbone."""
    if not stage.per_backbone:
        return lambda wildcards: stage.cmd
    return lambda wildcards: stage.cmd.replace(ITEM, wildcards.backbone)


def snakemake_inputs(stage: Stage, backbones: list[str], root: Path = Path(".")) -> list[str]:
    """Inputs as Snakemake patterns. A source folder (``data/groups``) is listed file by file:
    Snakemake sees a folder's own mtime only, so an in-place edit of a file inside would go unnoticed
    (DVC hashes the folder's content)."""
    out: list[str] = []
    for i in stage.inputs:
        if i == CHECKED:
            # DVC only: Snakemake validates params.yaml when it reads the Snakefile, before it schedules
            # anything. As a Snakemake input the marker would rerun every stage on any params edit:
            # Snakemake plans its jobs before the check has rewritten the (unchanged) marker.
            continue
        if i == GROUPS_DIR:
            out += sorted(str(p.relative_to(root)) for p in (root / i).rglob("*") if p.is_file())
        else:
            out.append(wildcard(i))
    return out + [g.replace(ITEM, b) for g in stage.gather for b in backbones]


def snakemake_outputs(stage: Stage) -> list[Any]:
    """Output patterns; folders are marked with Snakemake's ``directory()`` by the Snakefile."""
    return [wildcard(o) for o in stage.outputs]


def render_dvc_yaml(stages: tuple[Stage, ...] = STAGES) -> str:
    body = {"stages": {s.name: s.to_dvc() for s in stages}, "metrics": list(TOP_METRICS), "plots": list(TOP_PLOTS)}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd pipeline", description="write, check or print dvc.yaml, rendered from the stage table; prune what dropped backbones left")
    ap.add_argument("action", choices=["write", "check", "show", "prune"], help="write: regenerate the file; check: fail when it is out of date; show: print it; "
                    "prune: remove the outputs of backbones no longer in params.yaml's backbones (models/<b>/, predictions/<b>/, …)")
    ap.add_argument("--file", default="dvc.yaml", help="the file to write or check (default: dvc.yaml)")
    ap.add_argument("--params", default=PARAMS_FILE, help=f"prune: the params whose backbones stay (default: {PARAMS_FILE})")
    ap.add_argument("--dry-run", action="store_true", help="prune: list what would be removed, remove nothing")
    args = ap.parse_args(argv)
    if args.action == "prune":
        from hcd.pipeline.params import load_params
        from hcd.pipeline.prune import prune

        prune(load_params(args.params).backbones, dry_run=args.dry_run)
        return
    text = render_dvc_yaml()
    path = Path(args.file)
    if args.action == "show":
        sys.stdout.write(text)
    elif args.action == "write":
        from hcd.atomic import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    elif not path.exists() or path.read_text() != text:
        raise HcdError(f"{path}: out of date with hcd/pipeline/table.py — run `hcd pipeline write`")
