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
checkout) dropped, the bytes are deterministic, so both engines write the same bundle.

A bundle is made to be shared, so nothing in it is trusted until :func:`load_bundle` has checked
all of it, before any model is opened: the manifest's schema and every number's range; every file
it uses listed with its sha256, a plain file inside the bundle (no link, no FIFO, no ``..``), read
once and hashed from the very bytes that are then used; no ONNX tensor stored outside its file
(onnxruntime would read such "external data" from any path the model names); and each model's
crop, resize and normalisation equal to its own ``model.json``. Every refusal is one line naming
the file and the problem. Both runtimes of ``hcd infer`` load from the checked bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hcd.errors import HcdError, excerpt
from hcd.model.meta import ModelMeta, Spread, Unit
from hcd.pipeline.params import _format_error, check_backbone_name

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


MAX_MANIFEST_BYTES = 4 * 2**20
MAX_FILE_BYTES = 4 * 2**30  # a model file; far above any backbone hcd trains
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELPATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*){0,2}$")  # at most 3 plain parts
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class BundleModel(_Loose):
    file: str
    fold: int | None = Field(ge=0, le=19)
    mean: tuple[Unit, Unit, Unit]
    std: tuple[Spread, Spread, Spread]


class BundleBackbone(_Loose):
    name: str
    crop: int = Field(ge=32, le=96)
    upscale: int | None = Field(ge=32, le=512)
    input_size: int
    models: list[BundleModel] = Field(min_length=1, max_length=20)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_backbone_name(v)

    @model_validator(mode="after")
    def _files(self) -> "BundleBackbone":
        if self.input_size != (self.upscale or self.crop):
            raise ValueError(f"input_size: {self.input_size} is neither upscale ({self.upscale}) nor crop ({self.crop})")
        want = model_files(None if len(self.models) == 1 and self.models[0].fold is None else len(self.models))
        for k, (m, fname) in enumerate(zip(self.models, want)):
            if m.file != f"{self.name}/{fname}" or (m.fold is not None and m.fold != k):
                raise ValueError(f"models.{k}: file {excerpt(m.file)} (fold {m.fold}) is not {self.name}/{fname}")
        return self


class BundleEnsemble(_Loose):
    method: Literal["mean", "rank", "stack"]
    backbones: list[str]
    weights: list[Finite] | None = None
    intercept: Finite | None = None


class BundleTta(_Loose):
    views: Literal[1, 2, 4, 8]


class Manifest(_Loose):
    format: Literal[1]
    tta: BundleTta
    fold_average: Literal["mean", "rank"]
    ensemble: BundleEnsemble
    backbones: list[BundleBackbone] = Field(min_length=1, max_length=16)
    files: dict[str, str] = Field(min_length=1, max_length=1000)

    @field_validator("files")
    @classmethod
    def _listed(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            if not _RELPATH.match(rel) or ".." in rel.split("/"):
                raise ValueError(f"file name {excerpt(rel)} is not a plain path inside the bundle")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise ValueError(f"{rel}: {excerpt(str(digest))} is not a sha256 (64 hex digits)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        names = [b.name for b in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"backbones: a name appears twice in {names}")
        if self.ensemble.backbones != names:
            raise ValueError(f"ensemble.backbones: {excerpt(str(self.ensemble.backbones))} is not the bundle's backbones {names}")
        if self.ensemble.method == "stack" and (self.ensemble.weights is None or self.ensemble.intercept is None or len(self.ensemble.weights) != len(names)):
            raise ValueError(f"ensemble: method stack needs {len(names)} weights and an intercept")
        for b in self.backbones:
            for rel in [m.file for m in b.models] + [f"{b.name}/model.json", f"{b.name}/model.safetensors"]:
                if rel not in self.files:
                    raise ValueError(f"files: {rel} is used but not listed with its sha256")
        return self


@dataclass
class Bundle:
    """A checked bundle: its manifest and the bytes of every file it lists, read once."""

    folder: Path
    manifest: Manifest
    raw: dict[str, Any]  # the manifest as JSON
    data: dict[str, bytes]  # listed file -> its checked bytes

    def model_meta(self, backbone: str) -> dict:
        return json.loads(self.data[f"{backbone}/model.json"])


def load_bundle(folder: str | os.PathLike[str]) -> Bundle:
    """Check a bundle completely (see the module doc) before anything in it is used; one line naming the
    file and the problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HcdError(f"{folder}: not a folder (a bundle is the folder `dvc repro export` writes, export/)")
    path = folder / MANIFEST
    text = _read_plain(folder, MANIFEST, MAX_MANIFEST_BYTES, "not found (a bundle is the folder `dvc repro export` writes, export/)")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise HcdError(f"{path}: not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise HcdError(f"{path}: not an hcd bundle manifest (format {FORMAT})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise HcdError(_format_error(path, err).replace("backbones:", "backbones:", 1)) from None
    data = {}
    for rel, digest in manifest.files.items():
        blob = _read_plain(folder, rel, MAX_FILE_BYTES, "missing from the bundle (the manifest lists it)")
        if hashlib.sha256(blob).hexdigest() != digest:
            raise HcdError(f"{folder / rel}: sha256 differs from the manifest (the file was changed after export)")
        data[rel] = blob
    bundle = Bundle(folder, manifest, raw, data)
    for b in manifest.backbones:
        _check_against_model_json(bundle, b)
        for m in b.models:
            _check_onnx(folder / m.file, data[m.file])
    return bundle


def _read_plain(folder: Path, rel: str, cap: int, missing: str) -> bytes:
    """The bytes of ``folder/rel`` if it is a plain file inside ``folder`` (no link anywhere on the way, no FIFO or
    device: such a file could hang the read or point outside), at most ``cap`` bytes."""
    path = folder / rel
    parts = PurePosixPath(rel).parts
    for k in range(1, len(parts) + 1):
        here = folder.joinpath(*parts[:k])
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise HcdError(f"{path}: {missing}") from None
        except OSError as exc:
            raise HcdError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
        if stat.S_ISLNK(st.st_mode):
            raise HcdError(f"{here}: a symbolic link inside the bundle; refused (a bundle's files must be its own)")
        if k < len(parts) and not stat.S_ISDIR(st.st_mode):
            raise HcdError(f"{here}: not a folder")
    if not stat.S_ISREG(st.st_mode):
        raise HcdError(f"{path}: not a regular file; refused")
    if st.st_size > cap:
        raise HcdError(f"{path}: {st.st_size:,} bytes, more than a bundle file may hold ({cap:,})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read(cap + 1)[:cap]


def _check_against_model_json(bundle: Bundle, b: BundleBackbone) -> None:
    """The manifest's preprocessing of each model equals the one its own model.json records."""
    where = bundle.folder / b.name / "model.json"
    try:
        meta = json.loads(bundle.data[f"{b.name}/model.json"])
        checked = ModelMeta.model_validate(meta)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise HcdError(f"{where}: not valid JSON") from None
    except ValidationError as err:
        raise HcdError(_format_error(where, err)) from None
    if (checked.backbone, checked.crop, checked.upscale) != (b.name, b.crop, b.upscale):
        raise HcdError(f"{bundle.folder / MANIFEST}: backbone {b.name}: crop {b.crop}, upscale {b.upscale} disagree with {where} (backbone {excerpt(checked.backbone)}, crop {checked.crop}, upscale {checked.upscale})")
    own = [(f.mean, f.std) for f in checked.fold_models] if checked.fold_models is not None else [(checked.mean, checked.std)]
    if len(own) != len(b.models):
        raise HcdError(f"{bundle.folder / MANIFEST}: backbone {b.name}: {len(b.models)} models, but {where} records {len(own)}")
    for k, (m, (mean, std)) in enumerate(zip(b.models, own)):
        if not (_close(m.mean, mean) and _close(m.std, std)):
            raise HcdError(f"{bundle.folder / MANIFEST}: backbone {b.name}, model {k}: mean/std disagree with {where}")


def _close(a, b) -> bool:
    return all(abs(float(x) - float(y)) <= 1e-9 for x, y in zip(a, b, strict=True))


def _check_onnx(path: Path, blob: bytes) -> None:
    """A readable ONNX graph whose every tensor is stored inside it: onnxruntime would read a tensor's
    "external data" from whatever path the model names (any file the user can read)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load_from_string(blob)
    except Exception:  # the protobuf parser raises its own kinds
        raise HcdError(f"{path}: not a readable ONNX model") from None
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise HcdError(f"{path}: tensor {excerpt(tensor.name)} is stored outside the model file (ONNX external data); refused")
    names = [i.name for i in model.graph.input]
    if names != ["patches"] or [o.name for o in model.graph.output] != ["logit"]:
        raise HcdError(f"{path}: inputs {excerpt(str(names))} / outputs are not the bundle's (patches -> logit)")
