"""Trained models on disk: weights as safetensors (loading runs no code) and ``model.json``,
validated like params before inference trusts a value in it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hcd.atomic import Commit
from hcd.errors import HcdError
from hcd.model.factory import build_model
from hcd.pipeline.params import _format_error, check_backbone_name

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Spread = Annotated[float, Field(ge=1e-3, le=1.0)]  # a std of 0 would divide by zero


class FoldMeta(BaseModel):
    """One model's normalisation and best epoch: the file's only model, or one fold's."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    mean: tuple[Unit, Unit, Unit]
    std: tuple[Spread, Spread, Spread]
    best_epoch: int = Field(ge=1)


class ModelMeta(BaseModel):
    """The keys of ``model.json`` that inference trusts, checked like params before any use.
    One model (``mean``, ``std``, ``best_epoch`` at the top), or ``split.folds`` of them (``fold_models``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    backbone: str
    crop: int = Field(ge=32, le=96)
    upscale: int | None = Field(ge=32, le=512)
    mean: tuple[Unit, Unit, Unit] | None = None
    std: tuple[Spread, Spread, Spread] | None = None
    best_epoch: int | None = Field(None, ge=1)
    folds: int | None = Field(None, ge=2, le=20)
    fold_models: list[FoldMeta] | None = None

    @field_validator("backbone")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_backbone_name(v)

    @model_validator(mode="after")
    def _one_or_folds(self) -> "ModelMeta":
        if self.fold_models is None:
            for key in ("mean", "std", "best_epoch"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: Field required (a single model's file; a k-fold one has folds and fold_models)")
        elif self.folds != len(self.fold_models):
            raise ValueError(f"folds: {self.folds} does not match the {len(self.fold_models)} entries of fold_models")
        return self


def read_model_meta(path: Path) -> dict:
    """``model.json``, validated (:class:`ModelMeta`); one line naming the file and key otherwise."""
    from hcd.atomic import read_json

    raw = read_json(path)
    if not isinstance(raw, dict):
        raise HcdError(f"{path}: expected a JSON object")
    try:
        ModelMeta.model_validate(raw)
    except ValidationError as err:
        raise HcdError(_format_error(path, err).replace("backbones:", "backbone:", 1)) from None
    return raw


def save_model(out_dir: Path, state: dict[str, torch.Tensor], meta: dict, commit: Commit) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(commit.path(out_dir / "model.safetensors")))
    commit.json(out_dir / "model.json", meta)


def load_models(model_dir: Path, device: torch.device) -> tuple[list[tuple[torch.nn.Module, dict]], dict]:
    """Every model of one backbone — one, or one per fold (``split.folds``) — each with the metadata that
    preprocesses its input (crop, upscale and its own mean/std), plus the whole ``model.json``.
    Weights come from safetensors (no pickle, so no code can run)."""
    from safetensors.torch import load_file

    meta = read_model_meta(model_dir / "model.json")
    weights = model_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise HcdError(f"{weights}: file not found (run train first)") from None
    except Exception as exc:
        raise HcdError(f"{weights}: not a readable safetensors file ({type(exc).__name__})") from None
    common = {k: meta[k] for k in ("backbone", "crop", "upscale")}
    if "fold_models" not in meta or meta["fold_models"] is None:
        return [(_fit(meta["backbone"], state, weights, device), meta)], meta
    out = []
    for i, fold in enumerate(meta["fold_models"]):
        prefix = f"fold{i}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        out.append((_fit(meta["backbone"], part, weights, device, f" (fold {i})"), common | fold | {"fold": i}))
    return out, meta


def _fit(backbone: str, state: dict[str, torch.Tensor], weights: Path, device: torch.device, what: str = "") -> torch.nn.Module:
    model = build_model(backbone, pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HcdError(f"{weights}: does not fit backbone {backbone!r}{what} ({str(exc).splitlines()[0][:100]})") from None
    return model.to(device).eval()


def load_model(model_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The one model of a backbone trained on a single split (weights and ``model.json``)."""
    models, meta = load_models(model_dir, device)
    if len(models) != 1:
        raise HcdError(f"{model_dir / 'model.json'}: holds {len(models)} fold models; use load_models")
    return models[0][0], meta
