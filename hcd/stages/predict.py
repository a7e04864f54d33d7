"""Stage ``predict`` (one per backbone): probabilities for validation and test, with TTA.

Each patch's probability is the mean over ``predict.tta`` dihedral views
(1, 2, 4 or 8); all views of a batch go through the model in one forward pass.
Writes ``predictions/<backbone>/val.csv`` (id, label, prob) and ``test.csv``
(id, prob) — every ``sample_submission.csv`` id, in its order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from hcd.atomic import Commit, clean_stale_temps
from hcd.data.batches import PackedBatches, Preprocess
from hcd.data.packed import open_packed, read_index, read_split
from hcd.errors import HcdError
from hcd.model.inference import predict_probs
from hcd.model.weights import load_model
from hcd.pipeline.params import load_params
from hcd.runtime.device import oom_message, pick_device, set_threads
from hcd.runtime.seeding import seed_everything


def predict(model_dir: Path, packed: Path, index: Path, split: Path, test_packed: Path, test_index: Path, out_dir: Path, tta: int, batch_size: int, log=print) -> dict:
    seed_everything(0)
    set_threads()
    device = pick_device()
    model, meta = load_model(model_dir, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    prep = Preprocess(meta["crop"], meta["upscale"], tuple(meta["mean"]), tuple(meta["std"]))
    x, x_test = open_packed(packed), open_packed(test_packed)
    idx, sides = read_split(index, split, n_rows=len(x))
    val = (sides["side"] == "val").to_numpy()
    t0 = time.perf_counter()
    test_idx = read_index(test_index, columns=("row", "id"))
    try:
        p_val = predict_probs(model, PackedBatches(x, idx["row"].to_numpy()[val], device=device), prep, device, batch_size, tta)
        p_test = predict_probs(model, PackedBatches(x_test, test_idx["row"].to_numpy(), device=device), prep, device, batch_size, tta)
    except torch.OutOfMemoryError:  # a batch holds batch_size x tta views
        raise HcdError(oom_message(f"predict {meta['backbone']}", device, batch_size, "predict.batch_size", f" (a batch holds {tta} TTA views of each patch)")) from None
    seconds = time.perf_counter() - t0
    y = idx["label"].to_numpy()[val]
    with Commit() as commit:
        commit.csv(out_dir / "val.csv", pd.DataFrame({"id": idx["id"].to_numpy()[val], "label": y, "prob": p_val}))
        commit.csv(out_dir / "test.csv", pd.DataFrame({"id": test_idx["id"], "prob": p_test}))
    auc = float(roc_auc_score(y, p_val)) if len(set(y)) == 2 else float("nan")
    n = (len(p_val) + len(p_test)) * tta
    log(f"predict {meta['backbone']}: val AUC {auc:.4f} with TTA x{tta}; {n} views in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} views/s)")
    return {"val_auc": auc}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd predict", description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="a name in params.yaml's backbones")
    ap.add_argument("--model-dir", required=True, help="the trained model: model.safetensors and model.json (models/<backbone>)")
    ap.add_argument("--train-x", required=True, help="packed training patches (data/packed/train_x.npy)")
    ap.add_argument("--train-index", required=True, help="their index (data/packed/train_index.csv)")
    ap.add_argument("--split", required=True, help="train/validation sides (data/split/split.csv)")
    ap.add_argument("--test-x", required=True, help="packed test patches (data/packed/test_x.npy)")
    ap.add_argument("--test-index", required=True, help="their index, in sample_submission order (data/packed/test_index.csv)")
    ap.add_argument("--val-out", required=True, help="validation predictions id,label,prob (predictions/<backbone>/val.csv)")
    ap.add_argument("--test-out", required=True, help="test predictions id,prob (predictions/<backbone>/test.csv)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads predict.*)")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    val_out, test_out = Path(args.val_out), Path(args.test_out)
    if val_out.parent != test_out.parent:
        raise HcdError(f"{val_out} and {test_out}: predictions of one backbone go in one folder")
    clean_stale_temps(val_out, test_out)
    predict(Path(args.model_dir), Path(args.train_x), Path(args.train_index), Path(args.split), Path(args.test_x), Path(args.test_index), val_out.parent, p.predict.tta, p.predict.batch_size, log=lambda m: print(m, file=sys.stderr))
