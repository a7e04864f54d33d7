"""A picture of demo patches beside real ones: does the demo look like the data it stands in for?

Usage:
    python benchmarks/demo_grid.py --real PATH/TO/kaggle-layout.zip [--out docs/img/demo-vs-real.png] [--n 8]

Draws ``--n`` positives and ``--n`` negatives of the real sample (``--real``, default $HCD_REAL_ZIP; its
patches are only drawn into the picture, never copied) beside as many of the default demo's (the params in
``params.yaml``: the same patches `dvc repro` renders), each with the centre 32x32 px the label is about
outlined (green: tumour there). Which side is which is written above the columns.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcd.data.synth import _all_slides, render, truth  # noqa: E402
from hcd.pipeline.params import load_params  # noqa: E402


def real_patches(path: Path, n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    import tifffile

    with zipfile.ZipFile(path) as zf:
        root = next(name for name in zf.namelist() if name.endswith("train_labels.csv"))[: -len("train_labels.csv")]
        labels = pd.read_csv(io.BytesIO(zf.read(root + "train_labels.csv")), dtype={"id": str})
        pick = pd.concat([labels[labels["label"] == k].sample(n, random_state=seed) for k in (1, 0)])
        return [tifffile.imread(io.BytesIO(zf.read(f"{root}train/{i}.tif"))) for i in pick["id"]], pick["label"].tolist()


def demo_patches(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    p = load_params(REPO / "params.yaml").data.demo
    t, slides = truth(p), _all_slides(p)
    rng = np.random.default_rng(seed)
    rows = [i for k in (1, 0) for i in rng.choice(np.flatnonzero(t.train["label"].to_numpy() == k), n, replace=False)]
    return [render(p.seed, "train", int(i), int(t.train.loc[i, "drawn"]), slides.loc[int(t.train.loc[i, "slide"])], int(t.train.loc[i, "twin"])) for i in rows], [int(t.train.loc[i, "label"]) for i in rows]


def draw(panels: list[tuple[str, list[np.ndarray], list[int]]], n: int, out: Path) -> None:
    from PIL import Image, ImageDraw

    tile, gap, head = 100, 24, 26
    width = len(panels) * n * tile + (len(panels) - 1) * gap
    canvas = Image.new("RGB", (width, head + 2 * tile + 18), "white")
    pen = ImageDraw.Draw(canvas)
    for k, (title, imgs, labels) in enumerate(panels):
        x0 = k * (n * tile + gap)
        pen.text((x0 + 4, 6), title, fill="black")
        for j, (img, lab) in enumerate(zip(imgs, labels)):
            x, y = x0 + (j % n) * tile + 2, head + (j // n) * tile
            canvas.paste(Image.fromarray(img), (x, y))
            pen.rectangle([x + 32, y + 32, x + 63, y + 63], outline=(0, 190, 0) if lab else (235, 235, 235))
    pen.text((4, head + 2 * tile + 2), "top row: label 1 (tumour in the outlined centre); bottom row: label 0", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=os.environ.get("HCD_REAL_ZIP"), help="a Kaggle-layout zip (default: $HCD_REAL_ZIP)")
    ap.add_argument("--out", default=str(REPO / "docs/img/demo-vs-real.png"))
    ap.add_argument("--n", type=int, default=8, help="patches per row")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    if not args.real:
        raise SystemExit("demo_grid: give --real PATH (or set HCD_REAL_ZIP)")
    panels = [("real (Kaggle)", *real_patches(Path(args.real), args.n, args.seed)), ("demo (hcd's generator)", *demo_patches(args.n, args.seed))]
    draw(panels, args.n, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
