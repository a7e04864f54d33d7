"""Inference: probabilities for packed patches, averaged over test-time-augmentation views.

Used by the predict stage and by training's validation pass; it depends on no
training code, so editing the training loop never reruns prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from hcd.data.augment import tta_views
from hcd.data.batches import PackedBatches, Preprocess
from hcd.runtime.device import autocast_dtype


def predict_probs(model: torch.nn.Module, source: PackedBatches, prep: Preprocess, device: torch.device, batch_size: int, n_views: int = 1) -> np.ndarray:
    """Mean probability over ``n_views`` dihedral views per patch; all views of a batch in one forward."""
    out = probs_on_device(model, source, prep, device, batch_size, n_views)
    return out.cpu().numpy() if out is not None else np.zeros(0, np.float32)  # the one read-back


@torch.no_grad()
def probs_on_device(model: torch.nn.Module, source: PackedBatches, prep: Preprocess, device: torch.device, batch_size: int, n_views: int = 1) -> torch.Tensor | None:
    """:func:`predict_probs` without the read-back: no host-device synchronisation on a GPU (tests/test_gpu.py)."""
    model.eval()
    dtype = autocast_dtype(device)
    out = []
    for xb, _ in source.batches(batch_size):
        x = prep(xb, device, channels_last=device.type == "cuda")
        b = x.shape[0]
        views = tta_views(x, n_views) if n_views > 1 else x  # (V*B, C, H, W): one forward for every view
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(views).float().view(n_views, b)
        out.append(torch.sigmoid(logits).mean(0))
    return torch.cat(out) if out else None
