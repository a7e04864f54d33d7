"""Trained models on disk: weights as safetensors (loading runs no code) and ``model.json``,
validated like params before inference trusts a value in it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hcd.atomic import Commit
from hcd.errors import HcdError
from hcd.model.factory import build_model
from hcd.pipeline.params import _format_error, check_backbone_name

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Spread = Annotated[float, Field(ge=1e-3, le=1.0)]  # a std of 0 would divide by zero


class ModelMeta(BaseModel):
    """The keys of ``model.json`` that inference trusts, checked like params before any use."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    backbone: str
    crop: int = Field(ge=32, le=96)
    upscale: int | None = Field(ge=32, le=512)
    mean: tuple[Unit, Unit, Unit]
    std: tuple[Spread, Spread, Spread]
    best_epoch: int = Field(ge=1)

    @field_validator("backbone")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_backbone_name(v)


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


def load_model(model_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Weights from safetensors (no pickle, so no code can run) plus the metadata JSON."""
    from safetensors.torch import load_file

    meta = read_model_meta(model_dir / "model.json")
    model = build_model(meta["backbone"], pretrained=False)
    try:
        state = load_file(str(model_dir / "model.safetensors"))
    except FileNotFoundError:
        raise HcdError(f"{model_dir / 'model.safetensors'}: file not found (run train first)") from None
    except Exception as exc:
        raise HcdError(f"{model_dir / 'model.safetensors'}: not a readable safetensors file ({type(exc).__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HcdError(f"{model_dir / 'model.safetensors'}: does not fit backbone {meta['backbone']!r} ({str(exc).splitlines()[0][:100]})") from None
    return model.to(device).eval(), meta
