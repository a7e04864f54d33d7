"""`hcd infer` throughput ÷ the predict stage's, on the same test patches, side by side in one run.

Usage (in a checkout where the pipeline has run, so export/ and data/packed/ exist):
    python benchmarks/bench_infer.py [--root .] [--runtime onnx|torch] [--out benchmarks/out/infer.json]

Both sides predict every test patch with every backbone's models and the pipeline's TTA:
``predict`` from the packed uint8 array (``hcd.stages.predict`` per backbone, model
loading included), ``hcd infer`` from the patches as ``.tif`` files in a folder
(decoding and checks included, as a user runs it), through the export bundle.
Target: infer ≥ 0.9 × predict patches/s. Prints both, the ratio, and the largest
difference between infer's labels and results/submission.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcd.atomic import write_json  # noqa: E402
from hcd.data.tiff import encode_patch  # noqa: E402
from hcd.pipeline.params import load_params  # noqa: E402
from hcd.stages.predict import predict  # noqa: E402
from hcd.tools.infer import infer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="a checkout where the pipeline has run")
    ap.add_argument("--runtime", default="onnx", choices=["onnx", "torch"])
    ap.add_argument("--out", default="benchmarks/out/infer.json")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    p = load_params(root / "params.yaml")
    packed = root / "data/packed"
    x = np.load(packed / "test_x.npy", mmap_mode="r")
    ids = pd.read_csv(packed / "test_index.csv", dtype={"id": str})["id"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "test"
        folder.mkdir()
        for i, pid in enumerate(ids):
            (folder / f"{pid}.tif").write_bytes(encode_patch(np.asarray(x[i])))
        t0 = time.perf_counter()
        for b in p.backbones:
            predict(root / "models" / b, packed / "train_x.npy", packed / "train_index.csv", root / "data/split/split.csv", packed / "test_x.npy", packed / "test_index.csv", Path(tmp) / "pred" / b, p.predict.tta, p.predict.batch_size, p.predict.fold_average, log=lambda m: None)
        t_predict = time.perf_counter() - t0
        n_val = len(pd.read_csv(Path(tmp) / "pred" / p.backbones[0] / "val.csv"))
        t0 = time.perf_counter()
        got = infer(root / "export", [str(folder)], Path(tmp) / "infer.csv", args.runtime, p.predict.batch_size, progress=False, log=lambda m: None)
        t_infer = time.perf_counter() - t0
    # predict also scores the held-out patches: count them on its side
    predict_rate = (len(ids) + n_val) / t_predict
    infer_rate = len(ids) / t_infer
    sub = pd.read_csv(root / "results/submission.csv", dtype={"id": str}).merge(got, on="id", suffixes=("", "_infer"))
    ok = sub[sub["error"].fillna("") == ""]
    diff = float((ok["label"] - ok["label_infer"].astype(float)).abs().max())
    out = {"patches": len(ids), "held_out_patches_in_predict": n_val, "predict_patches_per_s": round(predict_rate, 1), "infer_patches_per_s": round(infer_rate, 1), "ratio": round(infer_rate / predict_rate, 3), "runtime": args.runtime, "tta": p.predict.tta, "max_abs_diff_vs_submission": diff}
    print(f"predict stage: {predict_rate:.0f} patches/s; hcd infer ({args.runtime}, from .tif files): {infer_rate:.0f} patches/s; ratio {out['ratio']} (target >= 0.9)")
    print(f"hcd infer vs results/submission.csv: max |diff| {diff:.2e} over {len(ok)} patches")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
