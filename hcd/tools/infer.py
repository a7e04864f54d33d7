"""``hcd infer BUNDLE INPUT… --out predictions.csv``: predictions for new patches from an export bundle.

INPUT is any mix of folders of ``.tif`` patches (a folder without any but with a
``test/`` folder inside — an extracted Kaggle download — uses ``test/``), zip
archives (Kaggle's layout: the ``test/`` members; any other zip: every ``.tif``
member) and single ``.tif`` files. Each patch is decoded and checked as the ``scan``
stage does; a bad file gets a row with its error (``id,label,error``) and the rest
go on. Preprocessing, TTA, fold averaging and the ensemble are the bundle's (its
manifest), so on the pipeline's own test patches the result equals
``results/submission.csv`` (to 1e-4; tested).

Patches stream through in batches: memory holds one batch of images plus one
probability per patch and model, whatever the number of inputs. ``rank`` ensembles
(and ``predict.fold_average: rank``) rank within the patches given, as the pipeline
ranks within its test set. Runtime: onnxruntime (default) or torch
(``--runtime torch``, from the bundle's safetensors).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch

from hcd.atomic import atomic_path
from hcd.data.augment import tta_views
from hcd.data.batches import Preprocess
from hcd.data.source import MAX_MEMBER_BYTES, ZIP_ERRORS
from hcd.data.tiff import PatchError, decode_patch
from hcd.errors import HcdError, excerpt
from hcd.model.bundle import Bundle, load_bundle
from hcd.model.combine import apply_ensemble, average_folds

TIF = (".tif", ".tiff")


def _read_file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise PatchError("undecodable", "a symbolic link; refused")
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never end
            raise PatchError("undecodable", "not a regular file (a FIFO, socket or device); refused unread")
        if st.st_size > MAX_MEMBER_BYTES:
            raise PatchError("undecodable", f"{st.st_size:,} bytes, too large for a patch")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))  # swapped since lstat: no wait
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise PatchError("undecodable", "not a regular file (a FIFO, socket or device); refused unread")
            return fh.read(MAX_MEMBER_BYTES + 1)

    return read


def iter_inputs(inputs: list[str]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(id, reader) per patch, in the order given (folders and archives sorted by name)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in TIF)
            if not files and (p / "test").is_dir():
                files = sorted(f for f in (p / "test").iterdir() if f.suffix.lower() in TIF)
            if not files:
                raise HcdError(f"{p}: no .tif patches in this folder (nor in a test/ folder inside)")
            for f in files:
                yield f.stem, _read_file(f)
        elif p.is_file() and p.suffix.lower() == ".zip":
            yield from _iter_zip(p)
        elif p.is_file():
            yield p.stem, _read_file(p)
        else:
            raise HcdError(f"{p}: not found")


def _iter_zip(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise HcdError(f"{path}: not a readable zip archive ({excerpt(str(exc), 60)})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(TIF)]
        test = [i for i in infos if PurePosixPath(i.filename).parts[-2:-1] == ("test",)]
        for info in sorted(test or infos, key=lambda i: i.filename):

            def read(info: zipfile.ZipInfo = info) -> bytes:
                if info.file_size > MAX_MEMBER_BYTES:
                    raise PatchError("undecodable", f"declares {info.file_size:,} bytes, too large for a patch")
                try:
                    with zf.open(info) as fh:
                        return fh.read(MAX_MEMBER_BYTES + 1)
                except ZIP_ERRORS as exc:  # bad CRC, encrypted, an unknown compression method...
                    raise PatchError("undecodable", f"zip member cannot be read ({type(exc).__name__}: {excerpt(str(exc), 60)})") from None

            yield PurePosixPath(info.filename).stem, read


class Models:
    """Every model of a checked bundle (:func:`hcd.model.bundle.load_bundle`), each with its preprocessing;
    ``probs(batch)`` -> (B, n_models). Both runtimes load from the bytes the check hashed."""

    def __init__(self, bundle: Bundle, runtime: str) -> None:
        self.tta = bundle.manifest.tta.views
        self.runs: list[tuple[Callable[[torch.Tensor], torch.Tensor], Preprocess]] = []
        self.owner: list[str] = []  # the backbone of each model
        for b in bundle.manifest.backbones:
            torch_models = self._torch_models(bundle, b.name) if runtime == "torch" else None  # every fold's, loaded once
            for k, m in enumerate(b.models):
                prep = Preprocess(b.crop, b.upscale, tuple(m.mean), tuple(m.std))
                self.runs.append((self._onnx(bundle.data[m.file]) if torch_models is None else torch_models[k], prep))
                self.owner.append(b.name)

    @staticmethod
    def _torch_models(bundle: Bundle, name: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        from safetensors.torch import load as load_safetensors

        from hcd.model.weights import models_from

        weights = bundle.folder / name / "model.safetensors"
        try:
            state = load_safetensors(bundle.data[f"{name}/model.safetensors"])
        except Exception as exc:  # the safetensors parser raises its own kinds
            raise HcdError(f"{weights}: not a readable safetensors file ({type(exc).__name__})") from None
        return [model for model, _ in models_from(bundle.model_meta(name), state, weights, torch.device("cpu"))]

    @staticmethod
    def _onnx(blob: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])  # from the checked bytes, not the path
        return lambda x: torch.from_numpy(sess.run(None, {"patches": x.numpy()})[0])

    @torch.no_grad()
    def probs(self, batch: np.ndarray) -> np.ndarray:
        """(B, 96, 96, 3) uint8 -> (B, n_models) probabilities, each the mean over the TTA views (as predict)."""
        u8 = torch.from_numpy(batch)
        out = []
        for run, prep in self.runs:
            x = prep(u8, torch.device("cpu"))
            views = tta_views(x, self.tta) if self.tta > 1 else x
            logits = run(views.contiguous()).float().view(self.tta, len(batch))
            out.append(torch.sigmoid(logits).mean(0).numpy())
        return np.stack(out, 1)


def infer(bundle: Path, inputs: list[str], out: Path, runtime: str = "onnx", batch_size: int = 256, progress: bool = True, log=print) -> pd.DataFrame:
    from tqdm import tqdm

    checked = load_bundle(bundle)
    manifest = checked.raw
    models = Models(checked, runtime)
    ids: list[str] = []
    errors: list[str] = []
    probs: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    t0 = time.perf_counter()
    bar = tqdm(unit="patch", desc="hcd infer", file=sys.stderr, mininterval=1.0, disable=None if progress else True)
    seen: set[str] = set()
    for pid, read in iter_inputs(inputs):
        try:
            if pid in seen:  # a patch given twice (a folder and a file in it): one row with its label, then this
                raise PatchError("duplicate", "this id was given earlier in the inputs; predicted once")
            seen.add(pid)
            arr = decode_patch(read())
            errors.append("")
            batch.append(arr)
        except PatchError as err:
            errors.append(f"{err.reason}: {err.detail}")
        except OSError as exc:
            errors.append(f"unreadable: {exc.strerror or type(exc).__name__}")
        ids.append(pid)
        if len(batch) == batch_size:
            probs.append(models.probs(np.stack(batch)))
            bar.update(len(batch))
            batch = []
    if batch:
        probs.append(models.probs(np.stack(batch)))
        bar.update(len(batch))
    bar.close()
    if not ids:
        raise HcdError("hcd infer: no patches in the inputs given")
    good = np.array([e == "" for e in errors])
    per_model = np.concatenate(probs) if probs else np.zeros((0, len(models.runs)))
    label = np.full(len(ids), np.nan)
    if len(per_model):
        label[good] = combine(manifest, models.owner, per_model)
    frame = pd.DataFrame({"id": ids, "label": label, "error": errors})
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    seconds = time.perf_counter() - t0
    n_good = int(good.sum())
    log(f"hcd infer: {n_good} patches predicted, {len(ids) - n_good} refused (see the error column) -> {out}; {n_good / max(seconds, 1e-9):.0f} patches/s ({runtime}, TTA x{models.tta}, {len(models.runs)} models)")
    return frame


def combine(manifest: dict, owner: list[str], per_model: np.ndarray) -> np.ndarray:
    """Per-model probabilities -> one per patch: fold models averaged per backbone, then the ensemble."""
    names = [b["name"] for b in manifest["backbones"]]
    cols = np.array(owner)
    per_backbone = np.stack([average_folds(per_model[:, cols == n], manifest["fold_average"]) if (cols == n).sum() > 1 else per_model[:, cols == n][:, 0] for n in names], 1)
    ens = manifest["ensemble"]
    return np.clip(apply_ensemble(ens["method"], per_backbone.astype(np.float64), ens), 0.0, 1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd infer", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("bundle", help="the export bundle folder (export/, written by the export stage)")
    ap.add_argument("inputs", nargs="+", help="folders of .tif patches, zip archives, or .tif files")
    ap.add_argument("--out", required=True, help="CSV to write: id,label,error")
    ap.add_argument("--runtime", choices=["onnx", "torch"], default="onnx", help="onnxruntime (default) or torch")
    ap.add_argument("--batch-size", type=int, default=256, help="patches per batch (default 256)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise HcdError(f"--batch-size: must be at least 1, got {args.batch_size}")
    from hcd.runtime.device import set_threads

    set_threads()
    infer(Path(args.bundle), args.inputs, Path(args.out), args.runtime, args.batch_size, log=lambda m: print(m, file=sys.stderr))
