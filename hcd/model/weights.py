"""Trained models on disk: weights as safetensors (loading runs no code) and ``model.json``,
validated like params before inference trusts a value in it."""

from __future__ import annotations

from pathlib import Path

import torch

from hcd.atomic import Commit
from hcd.errors import HcdError
from hcd.model.factory import build_model
from hcd.model.meta import FoldMeta, ModelMeta, Spread, Unit, read_model_meta  # noqa: F401 - re-exported: where model.json is checked


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
    return models_from(meta, state, weights, device), meta


def models_from(meta: dict, state: dict[str, torch.Tensor], weights: Path, device: torch.device) -> list[tuple[torch.nn.Module, dict]]:
    """The models of a checked ``model.json`` (``meta``) from its weights (``state``; ``weights`` names them in
    messages), each with the metadata that preprocesses its input."""
    common = {k: meta[k] for k in ("backbone", "crop", "upscale")}
    if "fold_models" not in meta or meta["fold_models"] is None:
        return [(_fit(meta["backbone"], state, weights, device), meta)]
    out = []
    for i, fold in enumerate(meta["fold_models"]):
        prefix = f"fold{i}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        out.append((_fit(meta["backbone"], part, weights, device, f" (fold {i})"), common | fold | {"fold": i}))
    return out


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
