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

    n_train: int = Field(6000, ge=20, le=400_000)
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


class Params(_Strict):
    seed: int = 42
    data: DataParams = DataParams()
    scan: ScanParams = ScanParams()
    split: SplitParams = SplitParams()


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = first["msg"].removeprefix("Value error, ")
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
