"""Stage ``export``: one self-contained bundle of the run — every backbone as ONNX, one manifest.

Writes ``export/`` (:mod:`hcd.model.bundle`): per backbone the ONNX graph of each
model (one, or one per fold) with the same weights as safetensors, and
``manifest.json`` holding the preprocessing of each model (centre crop, upscale,
mean/std), the TTA views, how fold models and backbones are combined (the
ensemble's method and fitted weights), the params the models came from with their
sha256, the git blob id of every source file that decided it, and the sha256 of every file.
``hcd infer export/ PATCHES…`` predicts from it exactly as the pipeline does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from hcd import env
from hcd.atomic import Commit, clean_stale_temps, read_json
from hcd.digests import file_sha256, git_blob_ids
from hcd.errors import HcdError
from hcd.model.bundle import FORMAT, MANIFEST, export_onnx, model_files
from hcd.model.weights import load_models
from hcd.pipeline.params import Params, load_params
from hcd.pipeline.table import BUNDLE_CODE, EXPORT_PARAMS, code_files, per_backbone


def export_backbone(name: str, model_dir: Path, dest: Path) -> dict:
    """ONNX graphs and weights of one backbone into ``dest``; its manifest entry."""
    models, meta = load_models(model_dir, torch.device("cpu"))
    folds = meta.get("folds")
    size = meta["upscale"] or meta["crop"]
    entries = []
    for (model, m), fname in zip(models, model_files(folds)):
        export_onnx(model, size, dest / fname)
        entries.append({"file": f"{name}/{fname}", "fold": m.get("fold"), "mean": m["mean"], "std": m["std"]})
    for f in ("model.safetensors", "model.json"):
        shutil.copyfile(model_dir / f, dest / f)
    return {"name": name, "crop": meta["crop"], "upscale": meta["upscale"], "input_size": size, "models": entries}


def export(params: Params, model_dirs: dict[str, Path], ensemble_json: Path, out: Path, log=print) -> dict:
    """``model_dirs``: each backbone's trained model folder (models/<backbone>)."""
    ens = read_json(ensemble_json)
    if ens.get("backbones") != params.backbones:
        raise HcdError(f"{ensemble_json}: made for backbones {ens.get('backbones')}, params.yaml has {params.backbones} (rerun ensemble)")
    chosen = {k: v for k, v in params.model_dump(mode="json").items() if k in EXPORT_PARAMS}
    with Commit() as commit:
        folder = commit.dir(out)
        backbones = []
        for b in params.backbones:
            (folder / b).mkdir(parents=True)
            backbones.append(export_backbone(b, model_dirs[b], folder / b))
            log(f"export {b}: {len(backbones[-1]['models'])} ONNX model(s), input {backbones[-1]['input_size']} px")
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "input": {"shape": [96, 96, 3], "dtype": "uint8", "layout": "height, width, RGB: a Kaggle .tif patch"},
            "preprocessing": "per model: centre crop of `crop` px; bilinear resize to `upscale` px when set (align_corners false, no antialias); /255; minus mean, divided by std per channel; NCHW float32",
            "tta": {"views": params.predict.tta, "kind": "dihedral: 1 identity; 2 + horizontal flip; 4 + vertical flip and half turn; 8 the whole group", "average": "probability mean"},
            "fold_average": params.predict.fold_average,
            "ensemble": ens,
            "backbones": backbones,
            "params": chosen,
            "params_sha256": hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest(),
            "code": git_blob_ids(list(code_files(*BUNDLE_CODE))),  # git blob ids: `git log --find-object=ID` (not HEAD: hcd.digests)
            "environment": env.environment(),
            "files": {f: file_sha256(folder / f) for f in files},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"export: {out}/ ({len(files)} files; `hcd infer {out} PATCHES… --out predictions.csv`)")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd export", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="each backbone's trained model, {item} standing for its name (models/{item})")
    ap.add_argument("--ensemble", required=True, help="the fitted ensemble (results/ensemble/ensemble.json)")
    ap.add_argument("--out", required=True, help="the bundle folder to write (export)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args(argv)
    clean_stale_temps(args.out)
    params = load_params(args.params)
    export(params, per_backbone(args.model_dir, params.backbones), Path(args.ensemble), Path(args.out), log=lambda m: print(m, file=sys.stderr))
