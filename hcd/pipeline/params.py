"""``params.yaml``: schema, loading and validation.

The schema is strict (``extra="forbid"``): a typo such as ``scan.dark_mx`` or
``data.source: kagle`` stops every stage before any work with a one-line error
naming the key. Both engines read the same file; each stage declares exactly the
keys it reads in :mod:`hcd.pipeline`, so a change reruns only what depends on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml

# pydantic looks for plugins in every installed distribution's entry points on its first model (28 ms of this
# module's 86 ms import here; far more on a machine with a slow disk and a large environment); hcd uses none
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402

from hcd.errors import HcdError, excerpt  # noqa: E402

DEFAULT_PARAMS = Path("params.yaml")


DEFAULT_BACKBONES = ["cnn", "resnet10t"]
SEED_MAX = 2**32 - 1  # numpy's seeds stop here; torch's at 2**64 - 1
GROUPS_DIR = "data/groups"  # where split.groups files live: a declared input of split in both engines
# A backbone name becomes a stage name (train@<name>), a command-line word and a folder
# (models/<name>/): one path component of letters, digits, '_', '-', '.', not starting with
# '.' or '-', never '..'. DVC interpolates it into a shell command before any hcd code runs;
# the `check` stage (hcd.check) refuses a bad name before DVC reaches that command.
BACKBONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
COMPETITION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")


class _Strict(BaseModel):
    # unknown keys refused; inf and nan refused in every float
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class DemoParams(_Strict):
    """The synthetic PCam-like dataset written when ``data.source: demo``."""

    n_train: int = Field(4000, ge=20, le=400_000)
    n_test: int = Field(1000, ge=5, le=100_000)
    positive_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    n_slides: int = Field(60, ge=2, le=100_000)  # patches come in slides: neighbours share stain and texture
    seed: Seed = 0
    plant_defects: bool = True  # dark/bright/truncated/wrong-size/conflicting-duplicate patches


class DataParams(_Strict):
    source: Literal["demo", "kaggle", "zip", "dir"] = "demo"
    path: str | None = Field(None, max_length=4096)  # the archive (zip) or folder (dir)
    competition: str = "histopathologic-cancer-detection"
    demo: DemoParams = DemoParams()

    @model_validator(mode="after")
    def _path_needed(self) -> "DataParams":
        if self.source in ("zip", "dir") and not self.path:
            raise ValueError(f"data.path: must name the {'archive' if self.source == 'zip' else 'folder'} when data.source is {self.source!r}")
        if self.path is not None and ("\0" in self.path or "\n" in self.path):
            raise ValueError("data.path: holds a NUL or newline character")
        if not COMPETITION_RE.match(self.competition):
            raise ValueError(f"data.competition: {excerpt(self.competition)} is not a Kaggle competition slug (lower-case letters, digits and '-')")
        return self


class ScanParams(_Strict):
    dark_max: int = Field(10, ge=0, le=255)  # near-black: no pixel above this
    bright_min: int = Field(245, ge=0, le=255)  # near-white: no pixel below this
    drop_outliers: bool = True  # dark/bright train patches left out of the packed arrays


class SplitParams(_Strict):
    val_fraction: float = Field(0.1, ge=0.01, le=0.5)
    seed: Seed = 42
    groups: str | None = None  # CSV id,group (slide) under data/groups/: split by group so no slide is on both sides
    folds: int = Field(1, ge=1, le=20)  # 1: one train/validation split; K >= 2: K folds, every labelled patch held out once

    @model_validator(mode="after")
    def _groups_inside(self) -> "SplitParams":
        if self.groups is not None:
            check_groups_path(self.groups)
        return self


def check_groups_path(value: str) -> PurePosixPath:
    """``split.groups`` must name a ``.csv`` inside ``data/groups/``: a declared input of split, inside the repository."""
    path = PurePosixPath(value)
    inside = path.parts[: len(PurePosixPath(GROUPS_DIR).parts)] == PurePosixPath(GROUPS_DIR).parts
    if not inside or path.is_absolute() or ".." in path.parts or len(path.parts) != 3 or path.suffix != ".csv" or not BACKBONE_RE.match(path.name):
        raise ValueError(f"split.groups: {excerpt(value)} must be a file {GROUPS_DIR}/<name>.csv (copy the file there: the split stage tracks that folder)")
    return path


class AugmentParams(_Strict):
    dihedral: bool = True  # random flips and quarter turns (the 8 symmetries of the square)
    rotate_deg: float = Field(0.0, ge=0.0, le=45.0)
    shift_px: int = Field(2, ge=0, le=16)
    brightness: float = Field(0.07, ge=0.0, lt=1.0)
    contrast: float = Field(0.05, ge=0.0, lt=1.0)
    hed_jitter: float = Field(0.0, ge=0.0, lt=1.0)  # stain jitter in optical-density space


class TrainParams(_Strict):
    epochs: int = Field(14, ge=1, le=1000)
    batch_size: int = Field(128, ge=2, le=8192)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD only
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.5, ge=0.0, le=1000.0)  # cosine only (one-cycle has its own warm-up)
    crop: int = Field(64, ge=32, le=96)  # px around the centre
    upscale: int | None = Field(None, ge=32, le=512)  # resize the crop to this many px (None: keep)
    augment: AugmentParams = AugmentParams()
    pretrained: bool | Annotated[str, Field(min_length=1, max_length=4096)] = False  # true: timm hub weights (needs a network); a path: local weights
    freeze_epochs: int = Field(0, ge=0, le=1000)  # train only the head for this many epochs first
    patience: int = Field(5, ge=0, le=1000)  # early stopping on validation AUC (0: off); the best epoch is kept
    pos_weight: Annotated[float, Field(gt=0.0, le=1000.0)] | Literal["auto"] | None = None  # BCE positive-class weight (> 0); auto = negatives/positives
    compile: bool = False  # torch.compile the model (CUDA)
    deterministic: bool = True  # CUDA: true = bit-identical reruns; false = cudnn.benchmark, fused AdamW, non-deterministic kernels (faster)
    max_steps: int | None = Field(None, ge=1, le=10**9)  # cap on steps per epoch (smoke runs, benchmarks); recorded in model.json
    processes: int = Field(1, ge=1, le=64)  # data-parallel ranks for one model (torchrun; one GPU each); batch_size stays the global batch
    sync_bn: bool = True  # with processes >= 2 on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)


class ModelOverride(_Strict):
    """Per-backbone settings that replace the shared ones in ``train`` (and ``lr``)."""

    lr: float | None = Field(None, gt=0.0, le=10.0)
    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=2, le=8192)
    optimizer: Literal["adamw", "sgd"] | None = None
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    schedule: Literal["onecycle", "cosine", "constant"] | None = None
    crop: int | None = Field(None, ge=32, le=96)
    upscale: int | None = Field(None, ge=32, le=512)
    pretrained: bool | Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    freeze_epochs: int | None = Field(None, ge=0, le=1000)


class PredictParams(_Strict):
    tta: Literal[1, 2, 4, 8] = 8  # dihedral views averaged per patch
    batch_size: int = Field(256, ge=1, le=8192)
    fold_average: Literal["mean", "rank"] = "mean"  # with split.folds >= 2: how the fold models' test predictions are combined


class EnsembleParams(_Strict):
    method: Literal["mean", "rank", "stack"] = "stack"  # stack: logistic regression fitted on validation


class ExplainParams(_Strict):
    tiles: int = Field(12, ge=2, le=60)  # patches per Grad-CAM grid
    seed: Seed = 0  # the random grid's sample


class MetricsParams(_Strict):
    bootstrap: int = Field(1000, ge=0, le=100_000)  # resamples for the AUC 95 % interval
    seed: Seed = 0


class Params(_Strict):
    seed: Seed = 42
    lr: float = Field(3e-3, gt=0.0, le=10.0)  # top level so `dvc exp run -S lr=1e-3` works; models.<name>.lr overrides
    backbones: list[str] = Field(DEFAULT_BACKBONES, max_length=64)
    data: DataParams = DataParams()
    scan: ScanParams = ScanParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    models: dict[str, ModelOverride] = {}
    predict: PredictParams = PredictParams()
    ensemble: EnsembleParams = EnsembleParams()
    metrics: MetricsParams = MetricsParams()
    explain: ExplainParams = ExplainParams()

    @model_validator(mode="before")
    @classmethod
    def _an_entry_per_backbone(cls, data: Any) -> Any:
        """Every listed backbone has a ``models`` entry, empty when the input gives none (a params *file* that
        lists backbones must give them: :func:`missing_model_entry`)."""
        backbones = data.get("backbones", DEFAULT_BACKBONES) if isinstance(data, dict) else None
        if isinstance(backbones, list) and isinstance(data.get("models") or {}, dict):
            given = data.get("models") or {}
            data = {**data, "models": {**{b: {} for b in backbones if isinstance(b, str) and b not in given}, **given}}
        return data

    @model_validator(mode="after")
    def _backbones(self) -> "Params":
        if not self.backbones:
            raise ValueError("backbones: the list is empty; name at least one (e.g. cnn, resnet18)")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError("backbones: a name appears twice")
        for name in self.backbones:
            check_backbone_name(name)
        unknown = [n for n in self.backbones if n != "cnn" and not _timm_has(n)]
        if unknown:
            raise ValueError(f"backbones: unknown backbone {unknown[0]!r} (any timm model name, or 'cnn')")
        for name in self.models:
            if name not in self.backbones:
                fix = f"; drop its entry (with dvc exp run: -S '~models.{name}')" if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", name) else ""  # echoed only when safe to paste
                raise ValueError(f"models: {excerpt(name)} is not in backbones {self.backbones}{fix}")
        for name in self.backbones:  # data-parallel ranks take equal shares of every batch
            cfg = self.for_backbone(name)[1]
            if cfg.batch_size % cfg.processes:
                raise ValueError(f"train.batch_size: {cfg.batch_size} (for {name}) does not split into train.processes: {cfg.processes} equal shares; use a multiple of {cfg.processes}")
        return self

    def for_backbone(self, name: str) -> tuple[float, TrainParams]:
        """The learning rate and training settings of one backbone, overrides applied."""
        over = self.models.get(name)
        if over is None:
            return self.lr, self.train
        changes = {k: v for k, v in over.model_dump(exclude={"lr"}).items() if v is not None}
        return over.lr or self.lr, self.train.model_copy(update=changes)


def check_backbone_name(name: str) -> str:
    """One safe path component and command-line word, or ValueError naming it (see BACKBONE_RE)."""
    if not isinstance(name, str) or not BACKBONE_RE.match(name) or ".." in name or name == "ensemble":
        raise ValueError(f"backbones: {excerpt(name)} is not a usable name (letters, digits, '_', '-', '.'; a timm model name or cnn)")
    return name




def _timm_has(name: str) -> bool:
    from hcd.model.names import is_backbone  # the shipped name list: no timm (torch) import

    return is_backbone(name)


def _format_error(path: Path | str, err: ValidationError) -> str:
    first = err.errors()[0]
    # union members add their type tag to the location ("constrained-float"): keep the keys alone
    key = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or re.fullmatch(r"\w+", str(p))) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head):  # cross-field checks name their key in the message
        key, msg = head, rest
    problem = "unknown key" if first["type"] == "extra_forbidden" else msg
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: {key}: {problem}{more}"


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; raise :class:`HcdError` naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HcdError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HcdError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HcdError(f"{path}: expected a mapping of keys at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise HcdError(_format_error(path, err) + _undo_hint(path)) from None
    problem = missing_model_entry(raw)
    if problem:
        raise HcdError(f"{path}: {problem}{_undo_hint(path)}")
    return params


def missing_model_entry(raw: dict[str, Any]) -> str | None:
    """A params file that lists ``backbones`` gives each an entry under ``models`` (``cnn: {}`` when nothing
    is overridden): each backbone's train stage depends on ``models.<name>`` alone, so tuning one backbone
    retrains no other, and DVC refuses a declared params key the file lacks. (A file without ``backbones``,
    one for a single tool, gets the defaults, and their entries, from the schema.)"""
    models = raw.get("models") or {}
    for name in raw.get("backbones") or []:
        if name not in models:
            return (f"models: backbone {name!r} has no entry; add `{name}: {{}}` under models "
                    f"(with dvc exp run: -S '++models.{name}={{}}'): each backbone's training depends on its own entry alone")
    return None


def _undo_hint(path: Path) -> str:
    """Where a bad value came from: a params file changed since the last commit can be restored with git."""
    import subprocess

    try:
        proc = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=path.parent.resolve(), capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if proc.returncode != 1:  # 0: as committed; other: not a git checkout
        return ""
    return f" — {path.name} differs from the last commit (set by `dvc exp run -S`, `hcd params apply` or by hand); `git checkout {path.name}` restores it"


def lookup(params: Params | dict[str, Any], dotted: str) -> Any:
    """``lookup(p, "split.val_fraction")`` -> the value, as plain data."""
    node: Any = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    for part in dotted.split("."):
        node = node[part]
    return node
