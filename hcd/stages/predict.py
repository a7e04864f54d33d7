"""Stage ``predict`` (one per backbone): probabilities for held-out and test patches, with TTA.

Each patch's probability is the mean over ``predict.tta`` dihedral views
(1, 2, 4 or 8); all views of a batch go through the model in one forward pass.
Writes ``predictions/<backbone>/val.csv`` and ``test.csv`` (id, prob — every
``sample_submission.csv`` id, in its order).

One split: ``val.csv`` holds the validation side (id, label, prob). With
``split.folds: K``: ``val.csv`` holds out-of-fold predictions of every labelled
patch (id, label, fold, prob — each from the model that did not train on it),
and a test patch's probability is the mean (or rank mean,
``predict.fold_average``) of the K fold models'.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from hcd.atomic import Commit, clean_stale_temps
from hcd.data.batches import PackedBatches, Preprocess
from hcd.data.packed import held_out, open_packed, read_index, read_split
from hcd.errors import HcdError
from hcd.model.combine import average_folds
from hcd.model.inference import predict_probs
from hcd.model.weights import load_models
from hcd.pipeline.params import load_params
from hcd.runtime.device import oom_message, pick_device, set_threads
from hcd.runtime.seeding import seed_everything


def predict(model_dir: Path, packed: Path, index: Path, split: Path, test_packed: Path, test_index: Path, out_dir: Path, tta: int, batch_size: int, fold_average: str = "mean", log=print) -> dict:
    seed_everything(0)
    set_threads()
    device = pick_device()
    models, meta = load_models(model_dir, device)
    x, x_test = open_packed(packed), open_packed(test_packed)
    idx, sides = read_split(index, split, n_rows=len(x))
    masks = held_out(sides, split)
    if len(masks) != len(models):
        raise HcdError(f"{model_dir / 'model.json'}: {len(models)} model(s), but {split} has {len(masks)} fold(s) (rerun train)")
    t0 = time.perf_counter()
    test_idx = read_index(test_index, columns=("row", "id"))
    rows = idx["row"].to_numpy()
    held_prob = np.full(len(idx), np.nan, dtype=np.float32)  # the dtype predict_probs returns: the CSV text is the same either way
    test_probs = []
    try:
        for (model, m), held in zip(models, masks):  # each model predicts the patches it did not train on, and the test set
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            prep = Preprocess(m["crop"], m["upscale"], tuple(m["mean"]), tuple(m["std"]))
            held_prob[held] = predict_probs(model, PackedBatches(x, rows[held], device=device), prep, device, batch_size, tta)
            test_probs.append(predict_probs(model, PackedBatches(x_test, test_idx["row"].to_numpy(), device=device), prep, device, batch_size, tta))
    except torch.OutOfMemoryError:  # a batch holds batch_size x tta views
        raise HcdError(oom_message(f"predict {meta['backbone']}", device, batch_size, "predict.batch_size", f" (a batch holds {tta} TTA views of each patch)")) from None
    seconds = time.perf_counter() - t0
    y = idx["label"].to_numpy()
    if len(masks) == 1:  # one split: the validation side
        val = masks[0]
        held_frame = pd.DataFrame({"id": idx["id"].to_numpy()[val], "label": y[val], "prob": held_prob[val]})
        p_test = test_probs[0]
    else:  # K folds: every labelled patch, predicted by the model that held it out
        fold = np.argmax(np.stack(masks, 1), 1)
        held_frame = pd.DataFrame({"id": idx["id"].to_numpy(), "label": y, "fold": fold, "prob": held_prob})
        p_test = average_folds(np.stack(test_probs, 1), fold_average)
    with Commit() as commit:
        commit.csv(out_dir / "val.csv", held_frame)
        commit.csv(out_dir / "test.csv", pd.DataFrame({"id": test_idx["id"], "prob": p_test}))
    yv, pv = held_frame["label"].to_numpy(), held_frame["prob"].to_numpy()
    auc = float(roc_auc_score(yv, pv)) if len(set(yv)) == 2 else float("nan")
    n = (len(pv) + len(p_test) * len(models)) * tta
    what = "val AUC" if len(models) == 1 else f"out-of-fold AUC ({len(models)} folds)"
    log(f"predict {meta['backbone']}: {what} {auc:.4f} with TTA x{tta}; {n} views in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} views/s)")
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
    predict(Path(args.model_dir), Path(args.train_x), Path(args.train_index), Path(args.split), Path(args.test_x), Path(args.test_index), val_out.parent, p.predict.tta, p.predict.batch_size, p.predict.fold_average, log=lambda m: print(m, file=sys.stderr))
