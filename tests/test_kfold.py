"""K-fold (``split.folds``): fold assignment, per-fold stats, fold models, out-of-fold predictions, stacking, spread.

On hand-made arrays (tests/conftest.training_arrays); the engines run a 3-fold demo in tests/test_e2e.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, training_arrays

from hcd.data.batches import PackedBatches, Preprocess
from hcd.data.packed import held_out, read_split
from hcd.errors import HcdError
from hcd.model.combine import average_folds
from hcd.model.inference import predict_probs
from hcd.model.weights import load_models
from hcd.pipeline.params import Params, SplitParams, load_params
from hcd.runtime.device import pick_device
from hcd.stages.ensemble import combine
from hcd.stages.metrics import fold_spread
from hcd.stages.predict import predict
from hcd.stages.split import assign_folds, fold_balance, read_groups
from hcd.stages.stats import channel_stats
from hcd.stages.train import train

K = 3


def index_of(n: int, pos_every: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"row": np.arange(n), "id": [f"{i:040x}" for i in range(n)], "label": (np.arange(n) % pos_every == 0).astype(int)})


def test_every_row_is_held_out_by_exactly_one_stratified_fold():
    idx = index_of(300, pos_every=3)
    fold = assign_folds(idx, SplitParams(folds=5, seed=1))
    assert set(fold) == set(range(5)) and (fold >= 0).all()
    bal = fold_balance(idx, fold, None)
    assert [f["n"] for f in bal["per_fold"]] == [60] * 5
    assert {f["positive"] for f in bal["per_fold"]} == {20}
    assert sum(f["n"] for f in bal["per_fold"]) == 300


def test_grouped_folds_keep_each_slide_in_one_fold():
    idx = index_of(400)
    groups = np.array([f"slide{i // 10}" for i in range(400)])  # 40 slides of 10 patches, both classes in each
    fold = assign_folds(idx, SplitParams(folds=4, seed=0), groups)
    owners = pd.DataFrame({"g": groups, "f": fold}).groupby("g")["f"].nunique()
    assert (owners == 1).all()
    bal = fold_balance(idx, fold, groups)
    assert bal["groups_in_two_folds"] == 0 and sum(f["groups"] for f in bal["per_fold"]) == 40


def test_kaggles_shared_slide_file_is_taken_as_it_comes(tmp_path):
    ids = pd.Series([f"{i:040x}" for i in range(4)])
    (tmp_path / "patch_id_wsi_full.csv").write_text("id,wsi\n" + "".join(f"{i},camelyon16_train_normal_{n:03d}\n" for n, i in enumerate(ids)))
    assert list(read_groups(tmp_path / "patch_id_wsi_full.csv", ids)) == [f"camelyon16_train_normal_{n:03d}" for n in range(4)]


@pytest.mark.parametrize(
    "folds, groups, message",
    [
        (7, None, "split.folds 7 needs at least 7 patches of each class; there are 6 positive"),
        (4, "three", "split.folds 4 needs at least 4 groups; data/groups/g.csv has 3"),
        (2, "by_class", "fold 0 holds"),
    ],
)
def test_folds_that_cannot_hold_both_classes_are_refused_before_training(folds, groups, message):
    idx = index_of(60, pos_every=10)  # 6 positive, 54 negative
    g = None
    if groups == "three":
        g = np.array([f"s{i % 3}" for i in range(60)])
    elif groups == "by_class":  # every slide one class: the positives' 2 slides can land in one fold
        g = np.where(idx["label"] == 1, np.where(np.arange(60) % 20 == 0, "p0", "p1"), [f"n{i % 2}" for i in range(60)])
        g = np.where(idx["label"] == 1, "p0", g)  # one positive slide: one fold gets no positive
    with pytest.raises(HcdError, match=message):
        assign_folds(idx, SplitParams(folds=folds, groups="data/groups/g.csv" if g is not None else None), g)


def test_folds_zero_is_refused_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("split:\n  folds: 0\n")
    with pytest.raises(HcdError, match=r"params.yaml: split.folds: .*greater than or equal to 1"):
        load_params(tmp_path / "params.yaml")


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """Hand-made arrays split into 3 folds, per-fold stats, and one cnn trained on them."""
    root = training_arrays(tmp_path_factory.mktemp("kfold"), 96, learnable=True)
    idx = pd.read_csv(root / "index.csv", dtype={"id": str})
    fold = assign_folds(idx, SplitParams(folds=K, seed=0))
    idx[["row", "id", "label"]].assign(fold=fold).to_csv(root / "split.csv", index=False)
    x = np.load(root / "x.npy", mmap_mode="r")
    per = [channel_stats(x, idx["row"].to_numpy()[fold != k]) for k in range(K)]
    (root / "stats.json").write_text(json.dumps({"folds": per}))
    p = Params.model_validate({"backbones": ["cnn"], "split": {"folds": K}, "train": {"epochs": 2, "batch_size": 16, "crop": 48, "patience": 0}})
    train("cnn", p, root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", root / "model", root / "live", log=lambda m: None)
    np.save(root / "test_x.npy", x[:20])
    idx.iloc[:20][["row", "id"]].to_csv(root / "test_index.csv", index=False)
    return root, p, fold


def test_fold_models_each_use_their_own_training_side_stats(folded):
    root, _, fold = folded
    models, meta = load_models(root / "model", torch.device("cpu"))
    assert meta["folds"] == K and len(models) == K and "mean" not in meta
    stats = json.loads((root / "stats.json").read_text())["folds"]
    for k, (_, m) in enumerate(models):
        assert m["mean"] == stats[k]["mean"] and m["fold"] == k
        assert stats[k]["n_patches"] == int((fold != k).sum())
    assert len({tuple(m["mean"]) for _, m in models}) == K  # three different training sides
    curves = json.loads((root / "live/metrics.json").read_text())
    assert set(curves) >= {"fold0", "fold1", "fold2", "fold2/best/epoch", "best/val_auc_mean"} and curves["fold2"]["val"]["auc"] > 0.5
    assert (root / "live/plots/metrics/fold1/val/auc.tsv").read_text().splitlines()[1].split("\t")[0] == "1"  # each fold's curve starts at epoch 1
    charts = yaml.safe_load((root / "live/dvc.yaml").read_text())["plots"]  # what `dvc plots show` draws: a line per fold in each chart
    assert [next(iter(c)) for c in charts] == [f"cnn — {w}, one line per fold ({K})" for w in ("training loss", "validation loss", "validation AUC")]
    assert list(charts[2].values())[0]["y"] == {f"plots/metrics/fold{k}/val/auc.tsv": "auc" for k in range(K)}
    assert all((root / "live" / f).exists() for c in charts for f in list(c.values())[0]["y"])
    assert not list((root / "model").glob("checkpoint*"))


def test_out_of_fold_predictions_and_the_test_mean_of_the_fold_models(folded, tmp_path):
    root, _, fold = folded
    predict(root / "model", root / "x.npy", root / "index.csv", root / "split.csv", root / "test_x.npy", root / "test_index.csv", tmp_path, tta=2, batch_size=32, log=lambda m: None)
    oof = pd.read_csv(tmp_path / "val.csv", dtype={"id": str})
    idx = pd.read_csv(root / "index.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "label", "fold", "prob"]
    assert oof["id"].tolist() == idx["id"].tolist()  # every labelled id exactly once
    assert (oof["fold"].to_numpy() == fold).all() and oof["prob"].notna().all()
    dev = pick_device()  # where the predict stage ran: the reference runs there too
    tol = 1e-6 if dev.type == "cpu" else 5e-3  # a GPU predicts under bf16 autocast (about 3 significant digits), batches of other sizes
    models, _ = load_models(root / "model", dev)
    x = np.load(root / "x.npy", mmap_mode="r")
    per_fold = []
    for model, m in models:
        prep = Preprocess(m["crop"], m["upscale"], tuple(m["mean"]), tuple(m["std"]))
        per_fold.append(predict_probs(model, PackedBatches(x, np.arange(20), device=dev), prep, dev, 32, 2))
        held = np.flatnonzero(fold == m["fold"])  # the out-of-fold rows come from the model that held them out
        np.testing.assert_allclose(oof["prob"].to_numpy()[held[:5]], predict_probs(model, PackedBatches(x, held[:5], device=dev), prep, dev, 32, 2), atol=tol)
    test = pd.read_csv(tmp_path / "test.csv", dtype={"id": str})
    np.testing.assert_allclose(test["prob"].to_numpy(), np.mean(per_fold, axis=0), atol=tol)


def test_a_kill_in_a_later_fold_keeps_the_finished_folds_and_ends_identical(folded, tmp_path, monkeypatch):
    import hcd.stages.train

    root, p, _ = folded
    real = hcd.stages.train.train_steps
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def dying(t, source, epoch, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # fold 1, epoch 2: fold 0 is finished, fold 1 has its epoch-1 checkpoint
            raise Killed
        return real(t, source, epoch, **kw)

    monkeypatch.setattr(hcd.stages.train, "train_steps", dying)
    out = tmp_path / "model"
    with pytest.raises(Killed):
        train("cnn", p, root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", out, tmp_path / "live", log=lambda m: None)
    assert sorted(f.name for f in out.glob("checkpoint*")) == ["checkpoint-fold0.pt", "checkpoint-fold1.pt"]
    monkeypatch.setattr(hcd.stages.train, "train_steps", real)
    said: list[str] = []
    train("cnn", p, root / "x.npy", root / "index.csv", root / "split.csv", root / "stats.json", out, tmp_path / "live", log=said.append)
    assert any("cnn fold 0: resuming after epoch 2" in s for s in said) and any("cnn fold 1: resuming after epoch 1" in s for s in said)
    assert (out / "model.safetensors").read_bytes() == (root / "model/model.safetensors").read_bytes()
    assert (out / "model.json").read_bytes() == (root / "model/model.json").read_bytes()
    assert not list(out.glob("checkpoint*"))


def test_stats_for_another_fold_count_are_refused(folded, tmp_path):
    root, p, _ = folded
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.2] * 3}))
    with pytest.raises(HcdError, match=r"stats.json: statistics for 1 fold\(s\), but the split has 3 \(rerun stats\)"):
        train("cnn", p, root / "x.npy", root / "index.csv", root / "split.csv", tmp_path / "stats.json", tmp_path / "m", tmp_path / "l", log=lambda m: None)


def test_held_out_reads_both_split_formats(folded):
    root, _, fold = folded
    _, sides = read_split(root / "index.csv", root / "split.csv")
    masks = held_out(sides)
    assert len(masks) == K and (np.sum(masks, axis=0) == 1).all()
    sides.loc[0, "fold"] = 7
    with pytest.raises(HcdError, match="fold column must number the folds"):
        held_out(sides, "x/split.csv")


def test_stacker_is_cross_validated_over_the_splits_folds():
    rng = np.random.default_rng(0)
    y = (np.arange(300) % 2).astype(int)
    val = np.clip(np.stack([y * 0.3 + rng.random(300) * 0.7, y * 0.2 + rng.random(300) * 0.8], 1), 0.01, 0.99)
    fold = np.arange(300) % 3
    cv, test, fit = combine("stack", val, val[:10], y, fold=fold)
    assert len(cv) == 300 and len(fit["weights"]) == 2
    # the first fold's stacked predictions come from a stacker fitted on folds 1 and 2 only
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression

    z = logit(val)
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(z[fold != 0], y[fold != 0])
    np.testing.assert_allclose(cv[fold == 0], lr.predict_proba(z[fold == 0])[:, 1], atol=1e-9)


def test_fold_spread_and_rank_average():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7])
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = fold_spread(y, p, fold)
    assert s["auc"] == [1.0, 0.75] and s["min"] == 0.75 and s["std"] == 0.125
    probs = np.array([[0.1, 0.5], [0.2, 0.9], [0.3, 0.6]])
    np.testing.assert_allclose(average_folds(probs, "mean"), probs.mean(1))
    np.testing.assert_allclose(average_folds(probs, "rank"), [0.0, 0.75, 0.75])


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_is_a_valid_recipe(config, tmp_path):
    """Each overlay, merged into the default params.yaml, passes the schema the stages use."""
    from hcd.pipeline.overlays import merged

    (tmp_path / "params.yaml").write_text(merged(REPO / "configs" / config, REPO / "params.yaml"))
    p = load_params(tmp_path / "params.yaml")
    if config in ("kaggle-best.yaml", "gpu-speedrun.yaml"):
        assert p.split.folds >= 3 and p.split.groups == "data/groups/patch_id_wsi_full.csv"
