"""Per-epoch training checkpoints: resume a killed run exactly where its last epoch ended.

After every epoch ``train`` writes ``models/<backbone>/checkpoint.pt`` (atomically:
a kill while writing leaves the previous one). It holds everything the next epoch
depends on — model, optimizer, scheduler and grad-scaler states, the torch, CUDA,
batch-order and augmentation generator states, the epoch, the best epoch so far
with its weights, the history and the early-stopping counter — so a resumed CPU
run ends with weights and metrics bit-identical to an uninterrupted one.

Each checkpoint carries a **run key**: a digest of everything that decides the
result — backbone, effective learning rate and train settings, seed, the device
(type, and the GPU's name and CUDA/cuDNN versions), the torch thread count
(CPU reductions are summed in thread-sized chunks), step cap, the environment
(Python, torch, timm, numpy and scikit-learn versions, the CPU), the source of the training code, the index, split and stats
files, and the full content of the packed array (sha256 streamed at ~1.8 GB/s
on the 2-core CI machine: 3.4 s for Kaggle's 6.1 GB, once per training start).
A checkpoint whose key
differs (changed params, data or code) is never resumed; it is set aside and
training starts from scratch. The file is not a declared output of either
engine, so neither deletes it before rerunning the stage; ``train`` removes it
once ``model.safetensors`` is written.

Loading uses ``torch.load(weights_only=True)``: tensors and plain containers
only, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from hcd.atomic import atomic_path
from hcd.digests import file_sha256
from hcd.errors import HcdError
from hcd.pipeline.table import TRAIN_CODE

FORMAT = 2  # 2: full-content key with threads and versions
NAME = "checkpoint.pt"
CODE = TRAIN_CODE  # modules whose code decides the weights (the train stage's code dependencies)


def device_identity(device: torch.device) -> dict[str, Any]:
    """What about the device changes the arithmetic: its type, and on CUDA the GPU and library versions."""
    ident: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        ident |= {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return ident


def run_key(settings: dict[str, Any], packed: Path, small_inputs: list[Path]) -> str:
    """Digest of the settings, the training code and the inputs; equal keys give equal runs."""
    from hcd import env

    code_dir = Path(__file__).resolve().parents[1]  # the hcd package
    parts = {
        "format": FORMAT,
        "settings": settings,
        "environment": env.environment(),  # the record model.json keeps: versions and CPU
        "code": {m: file_sha256(code_dir / f"{m}.py") for m in CODE},
        "inputs": {p.name: file_sha256(p) for p in small_inputs},
        "packed": file_sha256(packed),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sub_key(key: str, part: str) -> str:
    """The key of one part of a run (a fold of ``split.folds``): its own checkpoint is never another fold's."""
    return hashlib.sha256(f"{key}/{part}".encode()).hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load(path: Path, key: str, log=print) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this run (same key); otherwise None.

    A checkpoint of another run, or one that cannot be read, is renamed to
    ``checkpoint.pt.stale`` (not deleted: it may be someone's hours of work) and
    training starts from scratch.
    """
    if not path.exists():
        return None
    why = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, hostile (refused by weights_only), or from an incompatible torch
        state, why = (
            None,
            f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
        )
    if state is not None and (not isinstance(state, dict) or state.get("format") != FORMAT):
        state, why = None, "not an hcd checkpoint of this version"
    if state is not None and state.get("key") != key:
        state, why = None, "made with other params, data or code"
    if state is None:
        stale = path.with_name(path.name + ".stale")
        os.replace(path, stale)
        log(f"{path}: {why}; not resumed (kept as {stale.name}), training from scratch")
        return None
    return state


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise HcdError("checkpoint: CUDA random state for another set of GPUs")
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
