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

from hcd.data import PackedBatches, Preprocess, pick_device, set_threads
from hcd.errors import HcdError
from hcd.io import Commit, clean_stale_temps
from hcd.packed import open_packed
from hcd.params import load_params
from hcd.train import load_model, oom_message, predict_logits, seed_everything


def predict(model_dir: Path, packed: Path, index: Path, split: Path, test_packed: Path, test_index: Path, out_dir: Path, tta: int, batch_size: int, log=print) -> dict:
    seed_everything(0)
    set_threads()
    device = pick_device()
    model, meta = load_model(model_dir, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    prep = Preprocess(meta["crop"], meta["upscale"], tuple(meta["mean"]), tuple(meta["std"]))
    idx = pd.read_csv(index, dtype={"id": str})
    sides = pd.read_csv(split, dtype={"id": str})
    if not (sides["id"].to_numpy() == idx["id"].to_numpy()).all():
        raise HcdError(f"{split}: does not match {index} (rerun split)")
    val = (sides["side"] == "val").to_numpy()
    t0 = time.perf_counter()
    test_idx = pd.read_csv(test_index, dtype={"id": str}, keep_default_na=False)
    try:
        p_val = predict_logits(model, PackedBatches(open_packed(packed), idx["row"].to_numpy()[val], device=device), prep, device, batch_size, tta)
        p_test = predict_logits(model, PackedBatches(open_packed(test_packed), test_idx["row"].to_numpy(), device=device), prep, device, batch_size, tta)
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
    ap = argparse.ArgumentParser(prog="predict", description=__doc__.splitlines()[0])
    ap.add_argument("backbone")
    ap.add_argument("--models", default="models")
    ap.add_argument("--packed-dir", default="data/packed")
    ap.add_argument("--split", default="data/split/split.csv")
    ap.add_argument("--out", default="predictions")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    pk, out = Path(args.packed_dir), Path(args.out) / args.backbone
    clean_stale_temps(out / "val.csv", out / "test.csv")
    predict(Path(args.models) / args.backbone, pk / "train_x.npy", pk / "train_index.csv", Path(args.split), pk / "test_x.npy", pk / "test_index.csv", out, p.predict.tta, p.predict.batch_size, log=lambda m: print(m, file=sys.stderr))
