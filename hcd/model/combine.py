"""How probabilities are combined — over fold models (``predict.fold_average``) and over
backbones (``ensemble.method``): one home for the pipeline's stages and ``hcd infer``."""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit
from scipy.stats import rankdata

from hcd.errors import HcdError


def rank_mean(probs: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,): the mean of each column's ranks scaled to [0, 1] (robust to calibration differences).
    Ranks are relative to the rows given: the same patches give the same result."""
    return np.mean([(rankdata(probs[:, j]) - 1) / max(1, len(probs) - 1) for j in range(probs.shape[1])], axis=0)


def average_folds(probs: np.ndarray, how: str) -> np.ndarray:
    """Test probabilities (n, K) of the K fold models -> one per patch: their mean, or the mean of their
    ranks (``predict.fold_average: rank``; fold models calibrated differently weigh the same)."""
    if how == "mean":
        return probs.mean(1)
    if how == "rank":
        return rank_mean(probs)
    raise HcdError(f"params.yaml: predict.fold_average: unknown method {how!r}")


def stack_logits(probs: np.ndarray) -> np.ndarray:
    """The stacker's features: each backbone's probability as a logit, clipped away from 0 and 1."""
    return logit(np.clip(probs, 1e-6, 1 - 1e-6))


def apply_ensemble(method: str, probs: np.ndarray, fit: dict | None) -> np.ndarray:
    """(n, backbones) probabilities -> the ensemble's, with a fitted stacker's weights and intercept."""
    if method == "mean":
        return probs.mean(1)
    if method == "rank":
        return rank_mean(probs)
    if method == "stack":
        if not fit or fit.get("weights") is None or fit.get("intercept") is None:
            raise HcdError("ensemble: method stack needs the fitted weights and intercept (rerun ensemble)")
        return expit(stack_logits(probs) @ np.asarray(fit["weights"], dtype=float) + float(fit["intercept"]))
    raise HcdError(f"params.yaml: ensemble.method: unknown method {method!r}")
