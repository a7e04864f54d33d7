"""Three slide-grouped folds (``split.folds: 3``) through ``dvc repro`` and ``snakemake`` on the tiny demo.

A file of its own, beside ``tests/test_e2e.py``, so that pytest-xdist runs the two on different workers
(each run of both engines takes minutes on two cores). That a split param reruns split and everything
after it, not download or scan, is checked in ``tests/test_e2e.py`` on its baseline.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_e2e import ALL_STAGES, MODEL_STAGES, SNAKE_PARALLEL, digests, dvc_ran, infer_matches_submission, key_nowhere, repo_copy, set_params, sh, side_by_side, snakemake_would_run

pytestmark = pytest.mark.e2e


def test_three_folds_grouped_by_slide_through_both_engines(tmp_path_factory):
    """split.folds: 3 with the demo's slides as groups: both engines agree byte for byte; every labelled id
    gets one out-of-fold prediction, no slide is in two folds, test = mean of the fold models, the export
    bundle infers the submission; then what lr reruns. The fake Kaggle key is in nothing the runs made."""
    import numpy as np
    import pandas as pd
    import torch

    from hcd.data.batches import PackedBatches, Preprocess
    from hcd.model.inference import predict_probs
    from hcd.model.weights import load_models

    roots = [repo_copy(tmp_path_factory.mktemp(engine), split={"folds": 3, "groups": "data/groups/demo_slides.csv"}) for engine in ("dvc", "snakemake")]
    for root in roots:
        sh(root, "hcd", "demo-truth", "data/groups")
    dvc_root, snake_root = roots
    logs = side_by_side((dvc_root, ("dvc", "repro")), (snake_root, ("snakemake", *SNAKE_PARALLEL)))
    assert dvc_ran(logs[0]) == ALL_STAGES
    assert digests(dvc_root) == digests(snake_root)

    index = pd.read_csv(dvc_root / "data/packed/train_index.csv", dtype={"id": str})
    slides = pd.read_csv(dvc_root / "data/groups/demo_slides.csv", dtype=str).set_index("id")["group"]
    for b in ("cnn", "resnet10t"):
        oof = pd.read_csv(dvc_root / f"predictions/{b}/val.csv", dtype={"id": str})
        assert oof["id"].tolist() == index["id"].tolist() and oof["prob"].notna().all()  # every labelled id, once
        assert (oof.assign(g=oof["id"].map(slides)).groupby("g")["fold"].nunique() == 1).all(), "a slide in two folds"
    models, _ = load_models(dvc_root / "models/cnn", torch.device("cpu"))
    x_test = np.load(dvc_root / "data/packed/test_x.npy", mmap_mode="r")
    test_rows = pd.read_csv(dvc_root / "data/packed/test_index.csv")["row"].to_numpy()
    tta = yaml.safe_load((dvc_root / "params.yaml").read_text())["predict"]["tta"]
    per_fold = [predict_probs(m, PackedBatches(x_test, test_rows, device=torch.device("cpu")), Preprocess(i["crop"], i["upscale"], tuple(i["mean"]), tuple(i["std"])), torch.device("cpu"), 64, tta) for m, i in models]
    assert len(per_fold) == 3
    test = pd.read_csv(dvc_root / "predictions/cnn/test.csv")
    np.testing.assert_allclose(test["prob"].to_numpy(), np.mean(per_fold, axis=0), atol=1e-5)
    infer_matches_submission(dvc_root)  # three fold models per backbone in the bundle
    split = json.loads((dvc_root / "metrics/split.json").read_text())
    assert split["folds"] == 3 and split["groups_in_two_folds"] == 0 and sum(f["n"] for f in split["per_fold"]) == len(index)
    metrics = json.loads((dvc_root / "metrics/metrics.json").read_text())
    assert len(metrics["ensemble"]["folds"]["auc"]) == 3 and "auc_fold_std" in json.loads((dvc_root / "metrics/summary.json").read_text())["cnn"]

    set_params(snake_root, lr=0.0007)  # a training param: train and after, not split or stats
    assert snakemake_would_run(snake_root) == MODEL_STAGES | {"check"}
    set_params(dvc_root, lr=0.0007)
    status = sh(dvc_root, "dvc", "status")
    assert "train@cnn" in status and "split:" not in status and "stats:" not in status
    key_nowhere((dvc_root, snake_root), logs)
