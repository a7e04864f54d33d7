"""Training: bit-identical on the CPU, stops cleanly on a NaN loss, params checked first."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hcd.errors import HcdError
from hcd.params import Params
from hcd.train import load_model, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    n = 96
    x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(int)
    x[y == 1, 40:56, 40:56] = 60  # a dark centre: learnable
    np.save(root / "x.npy", x)
    ids = [f"{i:040x}" for i in range(n)]
    pd.DataFrame({"row": np.arange(n), "id": ids, "label": y, "outlier": 0}).to_csv(root / "index.csv", index=False)
    side = np.where(np.arange(n) % 3 == 0, "val", "train")  # both classes on each side
    pd.DataFrame({"row": np.arange(n), "id": ids, "label": y, "side": side}).to_csv(root / "split.csv", index=False)
    (root / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    return root


def params(**train) -> Params:
    return Params.model_validate({"backbones": ["cnn"], "train": {"epochs": 2, "batch_size": 16, "crop": 48, "patience": 0, **train}})


def run(root, out, p=None, **kw):
    return train("cnn", p or params(), root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", out, out / "live", log=lambda m: None)


def test_two_cpu_runs_give_bit_identical_weights(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "a")
    run(tiny_data, tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert (tmp_path / "a/model.json").read_text() == (tmp_path / "b/model.json").read_text()
    model, meta = load_model(tmp_path / "a", torch.device("cpu"))
    assert meta["backbone"] == "cnn" and meta["crop"] == 48 and len(meta["history"]) == 2


def test_another_seed_gives_other_weights(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "a")
    p = params()
    run(tiny_data, tmp_path / "b", Params.model_validate({**p.model_dump(), "seed": 7}))
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "b/model.safetensors").read_bytes()


def test_nan_loss_stops_with_epoch_step_and_lr_and_writes_nothing(tiny_data, tmp_path, monkeypatch):
    from hcd import models

    real_build = models.build_model

    def poisoned(name, pretrained=False):
        model = real_build(name, pretrained)
        with torch.no_grad():
            model.head[-1].bias.fill_(float("nan"))
        return model

    monkeypatch.setattr("hcd.train.build_model", poisoned)
    with pytest.raises(HcdError) as info:
        run(tiny_data, tmp_path / "nan")
    msg = str(info.value)
    assert "epoch 1, step 1, lr" in msg and "nan" in msg.lower()
    assert not (tmp_path / "nan/model.safetensors").exists() and not (tmp_path / "nan/model.json").exists()


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"backbones": []}, "backbones: the list is empty"),
        ({"backbones": ["resnet19"]}, "backbones: unknown backbone 'resnet19'"),
        ({"train": {"crop": 100}}, "train.crop: Input should be less than or equal to 96"),
        ({"train": {"epochz": 3}}, "train.epochz: unknown key"),
        ({"lr": -1}, "lr: Input should be greater than 0"),
        ({"predict": {"tta": 3}}, "predict.tta"),
    ],
)
def test_params_errors_name_the_key_before_any_work(tmp_path, raw, words):
    import yaml

    from hcd.params import load_params

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(HcdError) as info:
        load_params(f)
    assert words in str(info.value) and "\n" not in str(info.value)
