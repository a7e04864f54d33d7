"""``model.json``, checked like params before anything trusts a value in it — without torch, so a stage that
only reads the record (report) starts in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hcd.errors import HcdError
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
