"""The model bundle: every backbone as ONNX plus one manifest — what ``hcd infer`` (or any
ONNX runtime) needs to predict on new patches exactly as the pipeline does.

Layout (``export/``)::

    manifest.json            preprocessing, TTA, fold averaging, ensemble, params, sha256 of every file
    <backbone>/model.onnx    one model, or model-fold<k>.onnx per fold (split.folds)
    <backbone>/model.safetensors, model.json   the same weights for torch (``hcd infer --runtime torch``)

Each ONNX graph takes normalised float32 NCHW patches (crop, upscale and mean/std
applied: the manifest says how) and returns one logit per patch, with a dynamic
batch axis. The exporter is torch's own (``torch.onnx.export(dynamo=True)``), checked
with ``onnx.checker``; with the exporter's per-node stack traces (absolute paths of the
checkout) dropped, the bytes are deterministic, so both engines write the same bundle. A bundle is verified before use: a missing file or one whose sha256 differs
from the manifest is refused with one line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from hcd.digests import file_sha256
from hcd.errors import HcdError

FORMAT = 1
MANIFEST = "manifest.json"


def model_files(folds: int | None) -> list[str]:
    """ONNX file names of one backbone: one model, or one per fold."""
    return ["model.onnx"] if not folds else [f"model-fold{k}.onnx" for k in range(folds)]


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> None:
    """``model`` (eval mode, CPU) as ONNX at ``path``: input ``patches`` (N, 3, size, size) float32, output ``logit`` (N, 1)."""
    import onnx

    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress notes
        program = torch.onnx.export(
            model.eval(), (example,), input_names=["patches"], output_names=["logit"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False
        )
    proto = program.model_proto
    _drop_stack_traces(proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _drop_stack_traces(proto) -> None:
    """The exporter notes each node's Python stack trace, absolute source paths included: two checkouts
    of the same commit would write different bytes. The traces go; the rest of the metadata stays."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for g in graphs:
        for node in g.node:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def read_bundle(folder: str | Path) -> dict[str, Any]:
    """The manifest of a bundle whose every file is present and unaltered; one line naming the file otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise HcdError(f"{path}: not found (a bundle is the folder `dvc repro export` writes, export/)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HcdError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise HcdError(f"{path}: not an hcd bundle manifest (format {FORMAT})")
    for rel, digest in manifest["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise HcdError(f"{path}: file name {rel[:60]!r} points outside the bundle")
        f = folder / rel
        if not f.is_file():
            raise HcdError(f"{f}: missing from the bundle (the manifest lists it)")
        if file_sha256(f) != digest:
            raise HcdError(f"{f}: sha256 differs from the manifest (the file was changed after export)")
    return manifest
