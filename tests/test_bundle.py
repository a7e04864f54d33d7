"""The export bundle and `hcd infer`: ONNX parity with torch, tamper checks, bad patches, the pipeline's numbers.

A tiny cnn is trained once on hand-made arrays; the engines export and infer on the demo in tests/test_e2e.py.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_FIT, REPO

from hcd.data.augment import tta_views
from hcd.data.batches import PackedBatches, Preprocess
from hcd.data.tiff import encode_patch
from hcd.errors import HcdError
from hcd.model.bundle import load_bundle
from hcd.model.inference import predict_probs
from hcd.model.weights import load_models
from hcd.pipeline.params import Params
from hcd.tools.infer import infer

FIT = BUNDLE_FIT


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def pipeline_probs(root, rows: np.ndarray) -> np.ndarray:
    """What predict + ensemble give for these rows of x.npy: TTA x2 with torch, then the stacker."""
    (model, m), = load_models(root / "models/cnn", torch.device("cpu"))[0]
    prep = Preprocess(m["crop"], m["upscale"], tuple(m["mean"]), tuple(m["std"]))
    p = predict_probs(model, PackedBatches(np.load(root / "x.npy"), rows), prep, torch.device("cpu"), 64, 2).astype(np.float64)
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    return 1 / (1 + np.exp(-(z * FIT["weights"][0] + FIT["intercept"])))


def test_manifest_records_preprocessing_ensemble_params_and_digests(bundle):
    manifest = load_bundle(bundle / "export").raw
    (b,) = manifest["backbones"]
    assert b["name"] == "cnn" and b["crop"] == 48 and b["models"][0]["file"] == "cnn/model.onnx"
    assert manifest["tta"]["views"] == 2 and manifest["ensemble"] == FIT
    assert manifest["params"]["train"]["crop"] == 48 and len(manifest["params_sha256"]) == 64
    assert set(manifest["files"]) == {"cnn/model.onnx", "cnn/model.safetensors", "cnn/model.json"}


def test_onnxruntime_and_torch_agree_on_a_batch(bundle):
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(bundle / "export/cnn/model.onnx"))
    (model, m), = load_models(bundle / "models/cnn", torch.device("cpu"))[0]
    prep = Preprocess(m["crop"], m["upscale"], tuple(m["mean"]), tuple(m["std"]))
    x = tta_views(prep(torch.from_numpy(np.load(bundle / "x.npy")[:24]), torch.device("cpu")), 2).contiguous()
    sess = ort.InferenceSession(str(bundle / "export/cnn/model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"patches": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (48, 1) and np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("damage", ["tamper", "remove"])
def test_a_tampered_or_missing_bundle_file_is_refused_with_one_line(bundle, tmp_path, damage):
    copy = shutil.copytree(bundle / "export", tmp_path / "export")
    target = copy / "cnn/model.onnx"
    if damage == "tamper":
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = "cnn/model.onnx: sha256 differs from the manifest"
    else:
        target.unlink()
        expected = "cnn/model.onnx: missing from the bundle"
    with pytest.raises(HcdError, match=expected) as err:
        infer(copy, [str(bundle / "x.npy")], tmp_path / "out.csv", progress=False, log=lambda m: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.csv").exists()


def test_infer_gives_a_row_per_bad_file_and_the_pipelines_numbers_for_the_rest(bundle, tmp_path):
    x = np.load(bundle / "x.npy")
    folder = tmp_path / "patches"
    folder.mkdir()
    good = [3, 10, 17, 40, 63]
    for r in good:
        (folder / f"{r:040x}.tif").write_bytes(encode_patch(x[r]))
    (folder / "truncated.tif").write_bytes(encode_patch(x[0])[:5000])
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(x[1]).save(png, format="PNG")
    (folder / "renamed_png.tif").write_bytes(png.getvalue())
    (folder / "narrow.tif").write_bytes(encode_patch(np.ascontiguousarray(x[2][:95])))
    out = infer(bundle / "export", [str(folder)], tmp_path / "pred.csv", progress=False, log=lambda m: None)
    written = pd.read_csv(tmp_path / "pred.csv", dtype={"id": str}, keep_default_na=False)
    assert list(written.columns) == ["id", "label", "error"] and len(written) == 8
    bad = written[written["error"] != ""].set_index("id")["error"]
    assert set(bad.index) == {"truncated", "renamed_png", "narrow"}
    assert bad["renamed_png"].startswith("undecodable") and "PNG" in bad["renamed_png"]
    assert bad["narrow"].startswith("wrong_format") and bad["truncated"].startswith("undecodable")
    ok = out[out["error"] == ""]
    assert ok["id"].tolist() == [f"{r:040x}" for r in good]
    np.testing.assert_allclose(ok["label"].to_numpy(), pipeline_probs(bundle, np.array(good)), atol=1e-4)
    torch_out = infer(bundle / "export", [str(folder)], tmp_path / "pred_torch.csv", runtime="torch", progress=False, log=lambda m: None)
    np.testing.assert_allclose(torch_out["label"].to_numpy()[:5], ok["label"].to_numpy(), atol=1e-4)


def test_infer_reads_zips_and_single_files(bundle, tmp_path):
    import zipfile

    x = np.load(bundle / "x.npy")
    with zipfile.ZipFile(tmp_path / "kaggle.zip", "w") as zf:
        zf.writestr("train/" + "a" * 40 + ".tif", encode_patch(x[5]))  # Kaggle layout: only test/ is predicted
        for r in (6, 7):
            zf.writestr(f"test/{r:040x}.tif", encode_patch(x[r]))
    (tmp_path / "one.tif").write_bytes(encode_patch(x[8]))
    out = infer(bundle / "export", [str(tmp_path / "kaggle.zip"), str(tmp_path / "one.tif")], tmp_path / "p.csv", progress=False, log=lambda m: None)
    assert out["id"].tolist() == [f"{6:040x}", f"{7:040x}", "one"]
    np.testing.assert_allclose(out["label"].to_numpy(), pipeline_probs(bundle, np.array([6, 7, 8])), atol=1e-4)


def test_hcd_infer_command_line(bundle, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hcd", "infer", str(bundle / "export"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"hcd infer: error: {tmp_path / 'nowhere'}: not found"]


def test_lr_finder_suggests_a_sane_lr_with_a_finite_curve(bundle, tmp_path):
    """The range test on the hand-made arrays: a finite curve that starts at --start, a suggestion inside the sweep."""
    from hcd.tools.lrfind import lr_find

    root = tmp_path / "repo"
    (root / "data/packed").mkdir(parents=True)
    (root / "data/split").mkdir(parents=True)
    (root / "data/stats").mkdir(parents=True)
    shutil.copy(bundle / "x.npy", root / "data/packed/train_x.npy")
    shutil.copy(bundle / "index.csv", root / "data/packed/train_index.csv")
    shutil.copy(bundle / "split.csv", root / "data/split/split.csv")
    shutil.copy(bundle / "stats.json", root / "data/stats/stats.json")
    p = Params.model_validate({"backbones": ["cnn"], "train": {"batch_size": 8, "crop": 48}})
    said: list[str] = []
    out = lr_find("cnn", p, root, tmp_path / "lrf", [1e-4, 1e-2], 80, 1e-6, 1.0, log=said.append)
    curve = pd.read_csv(tmp_path / "lrf/cnn.csv")
    assert np.isfinite(curve[["lr", "loss", "smoothed"]].to_numpy()).all() and len(curve) >= 40
    assert curve.groupby("weight_decay")["lr"].min().round(12).tolist() == [1e-6, 1e-6]
    assert 1e-5 < out["suggested_lr"] < 1.0 and set(out["per_weight_decay"]) == {"0.0001", "0.01"}
    assert (tmp_path / "lrf/cnn.png").read_bytes()[:4] == b"\x89PNG"
    assert any("dvc exp run -S lr=" in s for s in said)  # one backbone: the top-level lr


class CentreOnly(torch.nn.Module):
    """A hand-made classifier whose logit depends only on the centre third of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.mask = CentreMask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(torch.relu(self.conv(x))).mean((1, 2, 3))[:, None]


class CentreMask(torch.nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(f)
        s = f.shape[-1] // 3
        keep[..., s : 2 * s, s : 2 * s] = 1
        return f * keep


def test_grad_cam_maps_are_finite_input_sized_and_find_the_centre():
    from hcd.model.cam import grad_cam, target_layer

    model = CentreOnly()
    torch.manual_seed(0)
    with torch.no_grad():
        model.conv.weight.abs_()  # positive evidence wherever there is signal
    x = torch.rand(5, 3, 48, 48)
    assert target_layer(model, 48) is model.mask  # found from the model: the last spatial map
    cams = grad_cam(model, x)
    assert cams.shape == (5, 48, 48) and np.isfinite(cams).all()
    centre = cams[:, 16:32, 16:32].sum() / cams.sum()
    assert centre > 0.9  # the centre is 1/9 of the area


def test_explain_grids_hold_the_patches_they_claim(bundle, tmp_path):
    from hcd.stages.explain import explain
    from hcd.stages.predict import predict

    root = bundle
    np.save(tmp_path / "test_x.npy", np.load(root / "x.npy")[:4])
    pd.DataFrame({"row": range(4), "id": [f"t{i}" for i in range(4)]}).to_csv(tmp_path / "test_index.csv", index=False)
    predict(root / "models/cnn", root / "x.npy", root / "index.csv", root / "split.csv", tmp_path / "test_x.npy", tmp_path / "test_index.csv", tmp_path / "pred", tta=2, batch_size=32, log=lambda m: None)
    tiles = explain("cnn", root / "models/cnn", root / "x.npy", root / "index.csv", root / "split.csv", tmp_path / "pred/val.csv", tmp_path / "grids", tmp_path / "tiles.csv", 6, 0, log=lambda m: None)
    val = pd.read_csv(tmp_path / "pred/val.csv", dtype={"id": str})
    p = val["prob"].clip(1e-7, 1 - 1e-7)
    val["loss"] = -(val["label"] * np.log(p) + (1 - val["label"]) * np.log(1 - p))
    worst = tiles[tiles["grid"] == "most_wrong"]
    assert set(worst["id"]) == set(val.nlargest(6, "loss")["id"])
    confident = tiles[tiles["grid"] == "confident"]
    assert ((confident["prob"] >= 0.5) == (confident["label"] == 1)).all()
    assert sorted(f.name for f in (tmp_path / "grids").iterdir()) == ["confident.png", "most_wrong.png", "random.png"]
    assert pd.read_csv(tmp_path / "tiles.csv", dtype={"id": str})["id"].tolist() == tiles["id"].tolist()


def test_the_manifest_records_each_source_file_by_the_blob_id_git_gives_it(tmp_path):
    """Content ids, not a commit: the same in every clone, so a fresh clone's export is the committed one."""
    import subprocess

    from hcd.digests import git_blob_ids
    from hcd.pipeline.table import BUNDLE_CODE, code_files

    paths = list(code_files(*BUNDLE_CODE))
    ids = git_blob_ids([str(REPO / p) for p in paths])
    for path, blob in ids.items():
        assert blob == subprocess.run(["git", "hash-object", path], capture_output=True, text=True, check=True).stdout.strip(), path
    assert {"hcd/stages/train.py", "hcd/model/inference.py", "hcd/stages/export.py"} <= set(paths)
