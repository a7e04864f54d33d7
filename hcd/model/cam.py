"""Grad-CAM heat maps for hcd's binary classifiers, with the ``grad-cam`` package (pytorch-grad-cam).

The target layer is found from the model itself, not from its family's layer names:
one forward pass with hooks on every module records which produce a spatial feature
map (N, C, H, W with H, W > 1), and the last such module to finish — the end of the
feature extractor, just before global pooling — is the layer Grad-CAM weighs. That
works for hcd's ``cnn`` and for any timm CNN (``layer4`` of a ResNet, the last stage
of an EfficientNet, DenseNet's final norm, ...).

The map is of the evidence *for tumour* (the logit's gradient, sign +1) on every
tile, so on a false positive it shows what misled the model.
"""

from __future__ import annotations

import numpy as np
import torch

from hcd.errors import HcdError


def target_layer(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """The last module, in the order modules finish, whose output is a spatial map (N, C, H>1, W>1)."""
    finished: list[torch.nn.Module] = []

    def hook(module, _inp, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1 and out.shape[-2] > 1:
            finished.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise HcdError(f"explain: {type(model).__name__} has no spatial feature map for Grad-CAM")
    return finished[-1]


def grad_cam(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Heat maps (N, H, W) in [0, 1], at the input's spatial size, for preprocessed patches ``x`` (N, 3, H, W)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    layer = target_layer(model, x.shape[-1])
    with GradCAM(model=model.eval(), target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)] * len(x))
    return np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
