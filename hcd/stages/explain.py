"""Stage ``explain`` (one per backbone): Grad-CAM grids of held-out patches — where the model looks.

Three grids of ``explain.tiles`` patches from the held-out predictions (the
validation side, or every labelled patch out-of-fold with ``split.folds``):

* ``most_wrong.png``  — the highest log loss (confident mistakes first);
* ``confident.png``   — the most confidently right: half true tumour, half true normal;
* ``random.png``      — a seeded random sample (``explain.seed``), the everyday picture.

Each tile is the 96 px patch with the model's Grad-CAM map (evidence for tumour;
:mod:`hcd.model.cam`) over the region the model sees, the centre 32×32 square
outlined (the label is about it), and the probability, label and loss above it.
``tiles.csv`` (beside the ``grids/`` folder) lists every tile (grid, id, fold, label, prob, loss). The maps come
from each patch's own model (its fold's, with folds), on the CPU: the same bytes
under both engines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hcd.atomic import Commit, clean_stale_temps
from hcd.data.batches import Preprocess
from hcd.data.packed import open_packed, read_split
from hcd.errors import HcdError
from hcd.model.cam import grad_cam
from hcd.model.weights import load_models
from hcd.pipeline.params import load_params
from hcd.runtime.device import set_threads

GRIDS = {
    "most_wrong": "most wrong: highest loss",
    "confident": "most confidently right: tumour (top rows), normal",
    "random": "a random sample",
}


def choose(pred: pd.DataFrame, n: int, seed: int) -> dict[str, pd.DataFrame]:
    """The tiles of each grid, from held-out predictions with a ``loss`` column."""
    right = pred[(pred["prob"] >= 0.5) == (pred["label"] == 1)]
    pos = right[right["label"] == 1].sort_values(["prob", "id"], ascending=[False, True]).head(n - n // 2)
    neg = right[right["label"] == 0].sort_values(["prob", "id"], ascending=[True, True]).head(n // 2)
    return {
        "most_wrong": pred.sort_values(["loss", "id"], ascending=[False, True]).head(n),
        "confident": pd.concat([pos, neg]),
        "random": pred.sample(n=min(n, len(pred)), random_state=seed),
    }


def heat_maps(models: list, rows: np.ndarray, folds: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(N, crop, crop) Grad-CAM maps of patches ``x[rows]``, each from the model of its fold (one batch per fold)."""
    out = np.zeros((len(rows), 1, 1), np.float32)
    for fold in np.unique(folds):
        pick = np.flatnonzero(folds == fold)
        model, m = models[int(fold)]
        prep = Preprocess(m["crop"], m["upscale"], tuple(m["mean"]), tuple(m["std"]))
        inp = prep(torch.from_numpy(np.stack([x[r] for r in rows[pick]])), torch.device("cpu"))
        cams = F.interpolate(torch.from_numpy(grad_cam(model, inp))[:, None], size=(m["crop"], m["crop"]), mode="bilinear", align_corners=False)[:, 0].numpy()
        if out.shape[1:] != cams.shape[1:]:
            out = np.zeros((len(rows), *cams.shape[1:]), np.float32)
        out[pick] = cams
    return out


def render(path: Path, title: str, patches: np.ndarray, maps: np.ndarray, tiles: pd.DataFrame, crop: int) -> None:
    """A grid of patches with their heat maps, the centre square and the numbers; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(tiles)
    cols = min(6, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.45 * rows + 0.5), squeeze=False)
    off = (96 - crop) // 2
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cam, (_, t) in zip(axes.flat, patches, maps, tiles.iterrows()):
        ax.imshow(img)
        ax.imshow(cam, cmap="jet", alpha=0.4, extent=(off - 0.5, off + crop - 0.5, off + crop - 0.5, off - 0.5), vmin=0, vmax=1)
        ax.add_patch(Rectangle((31.5, 31.5), 32, 32, fill=False, edgecolor="white", linewidth=1.2))
        if crop < 96:
            ax.add_patch(Rectangle((off - 0.5, off - 0.5), crop, crop, fill=False, edgecolor="white", linewidth=0.6, linestyle=":"))
        ax.set_xlim(-0.5, 95.5)
        ax.set_ylim(95.5, -0.5)
        wrong = (t["prob"] >= 0.5) != (t["label"] == 1)
        ax.set_title(f"p {t['prob']:.3f}  y {int(t['label'])}\nloss {t['loss']:.2f}  {t['id'][:8]}", fontsize=8, color="#b00000" if wrong else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def explain(backbone: str, model_dir: Path, packed: Path, index: Path, split: Path, preds: Path, grids: Path, tiles_csv: Path, n: int, seed: int, log=print) -> pd.DataFrame:
    set_threads()
    torch.manual_seed(0)
    models, meta = load_models(model_dir, torch.device("cpu"))
    x = open_packed(packed)
    idx, _ = read_split(index, split, n_rows=len(x))
    try:
        pred = pd.read_csv(preds, dtype={"id": str})
    except FileNotFoundError:
        raise HcdError(f"{preds}: not found (run predict for {backbone})") from None
    if "fold" not in pred.columns:
        pred["fold"] = 0
    row_of = pd.Series(idx["row"].to_numpy(), index=idx["id"])
    if not pred["id"].isin(row_of.index).all():
        raise HcdError(f"{preds}: ids that are not in {index} (rerun predict)")
    p = np.clip(pred["prob"].to_numpy(dtype=float), 1e-7, 1 - 1e-7)
    y = pred["label"].to_numpy()
    pred["loss"] = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    chosen = choose(pred, n, seed)
    records = []
    with Commit() as commit:
        folder = commit.dir(grids)
        for grid, tiles in chosen.items():
            rows = row_of[tiles["id"]].to_numpy()
            maps = heat_maps(models, rows, tiles["fold"].to_numpy(), x)
            render(folder / f"{grid}.png", f"{backbone} — {GRIDS[grid]} (Grad-CAM: evidence for tumour)", np.stack([x[r] for r in rows]), maps, tiles, meta["crop"])
            records.append(tiles.assign(grid=grid)[["grid", "id", "fold", "label", "prob", "loss"]])
        table = pd.concat(records, ignore_index=True)
        commit.csv(tiles_csv, table)
    log(f"explain {backbone}: {len(table)} tiles in {len(chosen)} grids -> {grids}/")
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hcd explain", description=__doc__.splitlines()[0])
    ap.add_argument("backbone", help="a name in params.yaml's backbones")
    ap.add_argument("--model-dir", required=True, help="the trained model (models/<backbone>)")
    ap.add_argument("--train-x", required=True, help="packed training patches (data/packed/train_x.npy)")
    ap.add_argument("--train-index", required=True, help="their index (data/packed/train_index.csv)")
    ap.add_argument("--split", required=True, help="the split (data/split/split.csv)")
    ap.add_argument("--predictions", required=True, help="held-out predictions (predictions/<backbone>/val.csv)")
    ap.add_argument("--grids", required=True, help="folder for the grid images (explain/<backbone>/grids)")
    ap.add_argument("--tiles", required=True, help="every tile: grid,id,fold,label,prob,loss (explain/<backbone>/tiles.csv)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; reads explain.*)")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    if args.backbone not in p.backbones:
        raise HcdError(f"backbones: {args.backbone!r} is not in {p.backbones}")
    clean_stale_temps(args.grids, args.tiles)
    explain(args.backbone, Path(args.model_dir), Path(args.train_x), Path(args.train_index), Path(args.split), Path(args.predictions), Path(args.grids), Path(args.tiles), p.explain.tiles, p.explain.seed, log=lambda m: print(m, file=sys.stderr))
