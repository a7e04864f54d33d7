"""Submission validation, ensemble methods, metrics and `hcd score`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from sklearn.metrics import roc_auc_score

from hcd.errors import HcdError
from hcd.scoring import bootstrap_auc, score, score_submission
from hcd.stages.ensemble import combine, validate_submission

IDS = [f"{i:040x}" for i in range(5)]


def sub(ids=IDS, labels=(0.1, 0.2, 0.3, 0.4, 0.5), cols=("id", "label")):
    return pd.DataFrame({cols[0]: list(ids), cols[1]: list(labels)})


def test_a_valid_submission_passes():
    validate_submission(sub(), IDS, "s.csv")


@pytest.mark.parametrize(
    "frame, words",
    [
        (sub(ids=IDS[::-1]), "not in sample_submission order"),
        (sub(ids=IDS[:4], labels=(0.1, 0.2, 0.3, 0.4)), "1 sample_submission ids missing"),
        (sub(ids=IDS + ["f" * 40], labels=(0.1,) * 6), "1 ids not in sample_submission"),
        (sub(labels=(0.1, np.nan, 0.3, 0.4, 0.5)), "1 labels are NaN"),
        (sub(labels=(0.1, 1.2, 0.3, 0.4, 0.5)), "probabilities in [0, 1]"),
        (sub(cols=("id", "prob")), "header must be 'id,label'"),
    ],
)
def test_submission_problems_are_one_line_errors(frame, words):
    with pytest.raises(HcdError) as info:
        validate_submission(frame, IDS, "s.csv")
    assert words in str(info.value) and str(info.value).startswith("s.csv:")


def test_ensemble_methods():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    val = np.clip(np.stack([y * 0.3 + rng.random(400) * 0.7, y * 0.2 + rng.random(400) * 0.8], 1), 0, 1)
    test = rng.random((50, 2))
    for method in ("mean", "rank", "stack"):
        v, t, w = combine(method, val, test, y)
        assert v.shape == (400,) and t.shape == (50,) and (0 <= t).all() and (t <= 1).all()
        assert roc_auc_score(y, v) >= max(roc_auc_score(y, val[:, 0]), roc_auc_score(y, val[:, 1])) - 0.02
    _, t, fit = combine("stack", val, test, y)
    assert fit is not None and fit["weights"][0] > 0 and fit["weights"][1] > 0
    from scipy.special import expit, logit

    np.testing.assert_allclose(t, expit(logit(np.clip(test, 1e-6, 1 - 1e-6)) @ np.array(fit["weights"]) + fit["intercept"]), atol=1e-12)  # what hcd infer applies


def test_score_matches_sklearn_and_its_interval_holds_it():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.25 + rng.random(500) * 0.75, 0, 1)
    m = score(y, p, n_boot=300, seed=0)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    lo, hi = m["auc_ci95"]
    assert lo < m["auc"] < hi and hi - lo < 0.15
    assert 0 <= m["at_youden"]["threshold"] <= 1
    a = m["at_0.5"]
    pred = p >= 0.5
    assert a["sensitivity"] == pytest.approx(pred[y == 1].mean()) and a["specificity"] == pytest.approx((~pred[y == 0]).mean())


@pytest.mark.parametrize("n, decimals", [(7, 1), (400, 2), (3000, 3)])
def test_the_bootstrap_interval_is_sklearns_on_the_same_resamples(n, decimals):
    """The sort-once bootstrap against what it replaced: roc_auc_score on each resample, drawn from the same
    generator in the same order (positives, then negatives), ties included (scores rounded, float32)."""
    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n)
    y[:2] = (1, 0)
    p = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1).round(decimals).astype(np.float32)
    draw, pos, neg = np.random.default_rng(5), np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = []
    for _ in range(120):
        s = np.concatenate([draw.choice(pos, len(pos)), draw.choice(neg, len(neg))])
        aucs.append(roc_auc_score(y[s], p[s]))
    np.testing.assert_allclose(bootstrap_auc(y, p, 120, 5), np.percentile(aucs, [2.5, 97.5]), rtol=0, atol=1e-14)
    assert np.isnan(bootstrap_auc(y, p, 0, 5)).all()  # no interval asked for


def test_hcd_score_cli(tmp_path):
    labels = pd.DataFrame({"id": IDS, "label": [0, 1, 0, 1, 1]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    sub(labels=(0.1, 0.9, 0.2, 0.8, 0.3)).to_csv(tmp_path / "sub.csv", index=False)
    out = subprocess.run([sys.executable, "-m", "hcd", "score", str(tmp_path / "sub.csv"), str(tmp_path / "labels.csv"), "--bootstrap", "50"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("AUC 1.0000")
    sub(ids=IDS[:3], labels=(0.1, 0.2, 0.3)).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(HcdError, match="no prediction for 2 labelled ids"):
        score_submission(tmp_path / "short.csv", tmp_path / "labels.csv")
