"""``params.yaml``: schema, loading and validation.

The schema is strict (``extra="forbid"``): a typo such as ``scan.dark_mx`` or
``data.source: kagle`` stops every stage before any work with a one-line error
naming the key. Both engines read the same file; each stage declares exactly the
keys it reads in :mod:`hcd.pipeline`, so a change reruns only what depends on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hcd.errors import HcdError

DEFAULT_PARAMS = Path("params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(_Strict):
    """The synthetic PCam-like dataset written when ``data.source: demo``."""

    n_train: int = Field(4000, ge=20, le=400_000)
    n_test: int = Field(1000, ge=5, le=100_000)
    positive_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    n_slides: int = Field(60, ge=2)  # patches come in slides: neighbours share stain and texture
    seed: int = 0
    plant_defects: bool = True  # dark/bright/truncated/wrong-size/conflicting-duplicate patches


class DataParams(_Strict):
    source: Literal["demo", "kaggle", "zip", "dir"] = "demo"
    path: str | None = None  # the archive (zip) or folder (dir)
    competition: str = "histopathologic-cancer-detection"
    demo: DemoParams = DemoParams()

    @model_validator(mode="after")
    def _path_needed(self) -> "DataParams":
        if self.source in ("zip", "dir") and not self.path:
            raise ValueError(f"data.path must name the {'archive' if self.source == 'zip' else 'folder'} when data.source is {self.source!r}")
        return self


class ScanParams(_Strict):
    dark_max: int = Field(10, ge=0, le=255)  # near-black: no pixel above this
    bright_min: int = Field(245, ge=0, le=255)  # near-white: no pixel below this
    drop_outliers: bool = True  # dark/bright train patches left out of the packed arrays


class SplitParams(_Strict):
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 42
    groups: str | None = None  # CSV id,group (slide): split by group so no slide is on both sides


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
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.5, ge=0.0)  # cosine only (one-cycle has its own warm-up)
    crop: int = Field(64, ge=32, le=96)  # px around the centre
    upscale: int | None = Field(None, ge=32, le=512)  # resize the crop to this many px (None: keep)
    augment: AugmentParams = AugmentParams()
    pretrained: bool | str = False  # true: timm hub weights (needs a network); a path: local weights
    freeze_epochs: int = Field(0, ge=0)  # train only the head for this many epochs first
    patience: int = Field(5, ge=0)  # early stopping on validation AUC (0: off); the best epoch is kept
    pos_weight: float | Literal["auto"] | None = None  # BCE positive-class weight; auto = negatives/positives
    compile: bool = False  # torch.compile the model (CUDA)


class ModelOverride(_Strict):
    """Per-backbone settings that replace the shared ones in ``train`` (and ``lr``)."""

    lr: float | None = Field(None, gt=0.0)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    optimizer: Literal["adamw", "sgd"] | None = None
    weight_decay: float | None = Field(None, ge=0.0)
    schedule: Literal["onecycle", "cosine", "constant"] | None = None
    crop: int | None = Field(None, ge=32, le=96)
    upscale: int | None = Field(None, ge=32, le=512)
    pretrained: bool | str | None = None
    freeze_epochs: int | None = Field(None, ge=0)


class PredictParams(_Strict):
    tta: Literal[1, 2, 4, 8] = 8  # dihedral views averaged per patch
    batch_size: int = Field(256, ge=1)


class EnsembleParams(_Strict):
    method: Literal["mean", "rank", "stack"] = "stack"  # stack: logistic regression fitted on validation


class MetricsParams(_Strict):
    bootstrap: int = Field(1000, ge=0)  # resamples for the AUC 95 % interval
    seed: int = 0


class Params(_Strict):
    seed: int = 42
    lr: float = Field(3e-3, gt=0.0)  # top level so `dvc exp run -S lr=1e-3` works; models.<name>.lr overrides
    backbones: list[str] = ["cnn", "resnet10t"]
    data: DataParams = DataParams()
    scan: ScanParams = ScanParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    models: dict[str, ModelOverride] = {}
    predict: PredictParams = PredictParams()
    ensemble: EnsembleParams = EnsembleParams()
    metrics: MetricsParams = MetricsParams()

    @model_validator(mode="after")
    def _backbones(self) -> "Params":
        if not self.backbones:
            raise ValueError("backbones: the list is empty; name at least one (e.g. cnn, resnet18)")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError("backbones: a name appears twice")
        for name in self.backbones:
            if not _BACKBONE_RE.match(name) or name == "ensemble":
                raise ValueError(f"backbones: {name!r} is not a usable name")
        unknown = [n for n in self.backbones if n != "cnn" and not _timm_has(n)]
        if unknown:
            raise ValueError(f"backbones: unknown backbone {unknown[0]!r} (any timm model name, or 'cnn')")
        for name in self.models:
            if name not in self.backbones:
                raise ValueError(f"models.{name}: not in backbones {self.backbones}")
        return self

    def for_backbone(self, name: str) -> tuple[float, TrainParams]:
        """The learning rate and training settings of one backbone, overrides applied."""
        over = self.models.get(name)
        if over is None:
            return self.lr, self.train
        changes = {k: v for k, v in over.model_dump(exclude={"lr"}).items() if v is not None}
        return over.lr or self.lr, self.train.model_copy(update=changes)


_BACKBONE_RE = __import__("re").compile(r"^[A-Za-z0-9_.-]+$")


def _timm_has(name: str) -> bool:
    import timm  # imported only when a name needs checking

    return bool(timm.is_model(name))


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if key == "(top level)" and ": " in msg:  # cross-field checks name their key in the message
        key, msg = msg.split(": ", 1)
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
        return Params.model_validate(raw)
    except ValidationError as err:
        raise HcdError(_format_error(path, err)) from None


def lookup(params: Params | dict[str, Any], dotted: str) -> Any:
    """``lookup(p, "split.val_fraction")`` -> the value, as plain data."""
    node: Any = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    for part in dotted.split("."):
        node = node[part]
    return node
