"""Training: bit-identical on the CPU, resumable from per-epoch checkpoints, stops cleanly on NaN or OOM, params checked first."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import training_arrays

from hcd.errors import HcdError
from hcd.model.weights import load_model
from hcd.pipeline.params import Params
from hcd.stages.train import train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return training_arrays(tmp_path_factory.mktemp("tiny"), 96, learnable=True)


def params(**train) -> Params:
    return Params.model_validate({"backbones": ["cnn"], "train": {"epochs": 2, "batch_size": 16, "crop": 48, "patience": 0, **train}})


def run(root, out, p=None, log=lambda m: None):
    return train("cnn", p or params(), root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", out, out / "live", log=log)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing after it runs (tests/test_faults.py sends the real signal)."""


def kill_during_epoch(monkeypatch, at_epoch: int) -> None:
    """Run ``at_epoch`` (0-based) for one step — weights and generators move — then die."""
    import hcd.stages.train

    real = hcd.stages.train.train_steps

    def dying(t, source, epoch, **kw):
        if epoch == at_epoch:
            real(t, source, epoch, **{**kw, "max_steps": 1})
            raise Killed
        return real(t, source, epoch, **kw)

    monkeypatch.setattr(hcd.stages.train, "train_steps", dying)


def files(root) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


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
    from hcd.model import factory

    real_build = factory.build_model

    def poisoned(name, pretrained=False):
        model = real_build(name, pretrained)
        with torch.no_grad():
            model.head[-1].bias.fill_(float("nan"))
        return model

    monkeypatch.setattr("hcd.stages.train.build_model", poisoned)
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
        ({"backbones": ["cnn", "resnet18"], "models": {"cnn": {}}}, "models: backbone 'resnet18' has no entry; add `resnet18: {}` under models (with dvc exp run: -S '++models.resnet18={}')"),
        ({"backbones": ["cnn"], "models": {"cnn": {}, "resnet18": {}}}, "models: 'resnet18' is not in backbones ['cnn']; drop its entry (with dvc exp run: -S '~models.resnet18')"),
    ],
)
def test_params_errors_name_the_key_before_any_work(tmp_path, raw, words):
    import yaml

    from hcd.pipeline.params import load_params

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(HcdError) as info:
        load_params(f)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_killed_run_resumes_from_its_last_epoch_and_ends_bit_identical(tiny_data, tmp_path, monkeypatch):
    p = params(epochs=4)
    run(tiny_data, tmp_path / "whole", p)
    kill_during_epoch(monkeypatch, at_epoch=2)
    with pytest.raises(Killed):
        run(tiny_data, tmp_path / "resumed", p)
    ckpt = tmp_path / "resumed/checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert not (tmp_path / "resumed/model.safetensors").exists()
    monkeypatch.undo()
    lines = []
    run(tiny_data, tmp_path / "resumed", p, log=lines.append)
    assert any("resuming after epoch 2" in m for m in lines)
    assert sum("epoch " in m and "train loss" in m for m in lines) == 2  # only epochs 3 and 4 ran again
    assert not ckpt.exists(), "a finished run removes its checkpoint"
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")  # weights, model.json and the dvclive curves


def test_changed_params_never_resume_a_stale_checkpoint(tiny_data, tmp_path, monkeypatch):
    kill_during_epoch(monkeypatch, at_epoch=1)
    with pytest.raises(Killed):
        run(tiny_data, tmp_path / "b", params(epochs=3))
    monkeypatch.undo()
    other = Params.model_validate({**params(epochs=3).model_dump(), "lr": 0.0005})
    lines = []
    run(tiny_data, tmp_path / "b", other, log=lines.append)
    assert any("made with other params, data or code; not resumed" in m for m in lines)
    assert (tmp_path / "b/checkpoint.pt.stale").exists()
    run(tiny_data, tmp_path / "fresh", other)
    assert (tmp_path / "b/model.safetensors").read_bytes() == (tmp_path / "fresh/model.safetensors").read_bytes()


def test_changed_data_never_resumes(tiny_data, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    kill_during_epoch(monkeypatch, at_epoch=1)
    with pytest.raises(Killed):
        run(data, tmp_path / "b", params(epochs=3))
    monkeypatch.undo()
    (data / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}))
    lines = []
    run(data, tmp_path / "b", params(epochs=3), log=lines.append)
    assert not any("resuming" in m for m in lines) and any("not resumed" in m for m in lines)


def test_local_pretrained_weights_are_recorded_and_replaced_ones_never_resume(tiny_data, tmp_path, monkeypatch):
    """``train.pretrained: <path>`` is a param; the file's content is not, so model.json records its digest and
    a checkpoint made from other weights at the same path is not resumed."""
    from safetensors.torch import save_file

    from hcd.digests import file_sha256
    from hcd.model.factory import build_model

    weights = tmp_path / "w.safetensors"

    def donor(seed: int) -> None:
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in build_model("cnn").state_dict().items()}, str(weights))

    donor(1)
    kill_during_epoch(monkeypatch, at_epoch=1)
    with pytest.raises(Killed):
        run(tiny_data, tmp_path / "b", params(epochs=2, pretrained=str(weights)))
    monkeypatch.undo()
    donor(2)
    lines = []
    run(tiny_data, tmp_path / "b", params(epochs=2, pretrained=str(weights)), log=lines.append)
    assert not any("resuming" in m for m in lines) and any("not resumed" in m for m in lines)
    assert json.loads((tmp_path / "b/model.json").read_text())["pretrained_sha256"] == file_sha256(weights)
    run(tiny_data, tmp_path / "plain")
    assert "pretrained_sha256" not in json.loads((tmp_path / "plain/model.json").read_text())


@pytest.mark.parametrize("damage", ["truncated", "hostile pickle", "not a checkpoint"])
def test_damaged_or_hostile_checkpoint_is_set_aside_and_never_runs_code(tiny_data, tmp_path, monkeypatch, damage):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = params(epochs=3)
    kill_during_epoch(monkeypatch, at_epoch=1)
    with pytest.raises(Killed):
        run(tiny_data, tmp_path / "b", p)
    monkeypatch.undo()
    ckpt = tmp_path / "b/checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "hostile pickle":
        torch.save({"format": 1, "key": "x", "payload": Evil()}, ckpt)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    lines = []
    run(tiny_data, tmp_path / "b", p, log=lines.append)
    assert not marker.exists(), "loading a checkpoint must never run code from it"
    assert any("not resumed" in m for m in lines) and not any("resuming" in m for m in lines)
    run(tiny_data, tmp_path / "fresh", p)
    assert (tmp_path / "b/model.safetensors").read_bytes() == (tmp_path / "fresh/model.safetensors").read_bytes()


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import hcd.stages.train

    real = hcd.stages.train.train_steps

    def poison_at_second_epoch(t, source, epoch, **kw):
        if epoch == 1:
            with torch.no_grad():
                t.model.head[-1].bias.fill_(float("inf"))
        return real(t, source, epoch, **kw)

    monkeypatch.setattr(hcd.stages.train, "train_steps", poison_at_second_epoch)
    with pytest.raises(HcdError) as info:
        run(tiny_data, tmp_path / "b", params(epochs=3))
    msg = str(info.value)
    assert "at epoch 2, step 1, lr" in msg and "last good checkpoint (epoch 1) is kept" in msg and "\n" not in msg
    assert torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "b/model.safetensors").exists()


def test_out_of_memory_names_the_batch_size_and_a_smaller_one(tiny_data, tmp_path, monkeypatch):
    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("hcd.stages.train.train_steps", oom)
    with pytest.raises(HcdError) as info:
        run(tiny_data, tmp_path / "b", params(batch_size=16))
    msg = str(info.value)
    assert "out of GPU memory" in msg and "at batch size 16" in msg and "models.cnn.batch_size" in msg and "to 8 or lower" in msg


def test_predict_out_of_memory_names_the_batch_size(tiny_data, tmp_path, monkeypatch):
    from hcd.stages.predict import predict

    run(tiny_data, tmp_path / "m", params(epochs=1))

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("hcd.stages.predict.predict_probs", oom)
    with pytest.raises(HcdError) as info:
        predict(tmp_path / "m", tiny_data / "x.npy", tiny_data / "index.csv", tiny_data / "split.csv", tiny_data / "x.npy", tiny_data / "index.csv", tmp_path / "p", tta=8, batch_size=512, log=lambda m: None)
    msg = str(info.value)
    assert "predict cnn: out of GPU memory" in msg and "batch size 512" in msg and "predict.batch_size to 256 or lower" in msg
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("each_step", [True, False], ids=["read-each-step", "read-once-per-epoch"])
def test_a_non_finite_loss_gives_one_message_whether_read_each_step_or_once_per_epoch(each_step):
    """The GPU reads the loss back once per epoch (no sync in the loop), the CPU every step: the message names the
    same value, epoch, step and learning rate either way (the GPU path is forced here on the CPU)."""
    import numpy as np

    from hcd.data.augment import AugmentConfig
    from hcd.data.batches import PackedBatches, Preprocess
    from hcd.model.factory import build_model
    from hcd.runtime.loop import Trainer, train_steps

    model = build_model("cnn")

    class NanOnThirdCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = model(x)
            return out * float("nan") if self.calls == 3 else out

    x = np.random.default_rng(0).integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    src = PackedBatches(x, np.arange(64), (np.arange(64) % 2).astype(np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s + 1.0)  # step k (from 0) runs at lr (k + 1) * 1e-3
    t = Trainer(model, NanOnThirdCall(), opt, sched, Preprocess(48, None, (0.5,) * 3, (0.25,) * 3), AugmentConfig(), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), 8, torch.device("cpu"), "m")
    t.check_each_step = each_step
    with pytest.raises(HcdError) as info:
        train_steps(t, src, epoch=1, progress=False)
    assert str(info.value) == "train m: loss is nan at epoch 2, step 3, lr 0.003 — lower lr or check the data; model not written"
