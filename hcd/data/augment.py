"""Batched tensor augmentation and test-time-augmentation views.

Everything works on a whole batch at once — ``(B, 3, H, W)`` float tensors on
any device — with no per-image Python: random draws are made per batch from a
``torch.Generator`` (so a seed fixes them), then applied with a handful of
vectorised ops. :func:`dihedral` is both the training augmentation's core and
the TTA view generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Haematoxylin-eosin-DAB stain vectors (rows), as in scikit-image's rgb2hed (Ruifrok & Johnston).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k = 0..7): k % 4 quarter turns, then a flip if k >= 4."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if k >= 4 else y


def tta_views(x: torch.Tensor, n_views: int) -> torch.Tensor:
    """``(n_views * B, C, H, W)``: the first ``n_views`` dihedral views of the batch, view-major.

    1 = identity; 2 = + horizontal flip; 4 = + vertical flip and half turn; 8 = the whole group.
    """
    order = {1: (0,), 2: (0, 4), 4: (0, 4, 6, 2), 8: tuple(range(8))}[n_views]
    return torch.cat([dihedral(x, k) for k in order], dim=0)


@dataclass(frozen=True)
class AugmentConfig:
    dihedral: bool = True
    rotate_deg: float = 0.0  # small rotation, uniform in [-deg, deg]
    shift_px: int = 0  # random shift of the crop window, uniform in [-px, px]
    brightness: float = 0.0  # multiplicative, uniform in [1-b, 1+b]
    contrast: float = 0.0  # around each image's mean, uniform in [1-c, 1+c]
    hed_jitter: float = 0.0  # stain jitter: HED channels scaled by U[1-j, 1+j] and shifted by U[-j, j]/10


def centre_window(size: int, crop: int) -> int:
    return (size - crop) // 2


def crop_batch(x: torch.Tensor, crop: int, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``crop`` px around the centre of every image; ``shift`` (B, 2) moves each window (clamped)."""
    b, c, h, w = x.shape
    top = centre_window(h, crop)
    if shift is None or crop == h:
        return x[:, :, top : top + crop, top : top + crop] if crop < h else x
    oy = (top + shift[:, 0]).clamp(0, h - crop)
    ox = (top + shift[:, 1]).clamp(0, w - crop)
    ar = torch.arange(crop, device=x.device)
    rows = oy[:, None] + ar[None, :]  # (B, crop)
    cols = ox[:, None] + ar[None, :]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # gather (B, crop, crop, C) then back to channels-first
    out = x.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A CPU tensor (random draws, indices) on ``dev``: on CUDA through pinned memory, so the copy
    is asynchronous — a pageable copy would make the host wait every step; on the CPU, itself."""
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random training augmentation of a float batch in [0, 1], shape (B, 3, 96, 96) -> (B, 3, crop, crop).

    All random numbers come from ``gen`` (on the CPU, so CPU and GPU runs draw the same values).
    """
    b = x.shape[0]
    dev = x.device

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return to_device(torch.rand(*shape, generator=gen) * (hi - lo) + lo, dev)

    if cfg.shift_px > 0 and crop < x.shape[-1]:
        shift = to_device(torch.randint(-cfg.shift_px, cfg.shift_px + 1, (b, 2), generator=gen), dev)
    else:
        shift = None
    if cfg.rotate_deg > 0:
        ang = uniform(b, lo=-cfg.rotate_deg, hi=cfg.rotate_deg) * math.pi / 180
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = crop_batch(x, crop, shift)
    if cfg.dihedral:
        ks = torch.randint(0, 8, (b,), generator=gen)
        out = torch.empty_like(x)
        for k in range(8):  # 8 vectorised ops per batch, whatever its size
            sel = to_device((ks == k).nonzero().squeeze(1), dev)  # on the CPU: no sync
            if len(sel):
                out[sel] = dihedral(x[sel], k)
        x = out
    if cfg.hed_jitter > 0:
        x = hed_jitter(x, uniform(b, 3, lo=1 - cfg.hed_jitter, hi=1 + cfg.hed_jitter), uniform(b, 3, lo=-cfg.hed_jitter / 10, hi=cfg.hed_jitter / 10))
    if cfg.brightness > 0:
        x = x * uniform(b, 1, 1, 1, lo=1 - cfg.brightness, hi=1 + cfg.brightness)
    if cfg.contrast > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * uniform(b, 1, 1, 1, lo=1 - cfg.contrast, hi=1 + cfg.contrast) + mean
    return x.clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _hed_matrices(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stain matrices on the device, copied once (not every batch)."""
    return _HED_FROM_RGB.to(device, dtype), _RGB_FROM_HED.to(device, dtype)


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Stain augmentation in optical-density space: each image's H, E, D concentrations are scaled and shifted."""
    eps = 1e-6
    od = -torch.log(x.clamp_min(eps))  # (B, 3, H, W)
    m_in, m_out = _hed_matrices(str(x.device), x.dtype)
    hed = torch.einsum("bchw,cd->bdhw", od, m_in)
    hed = hed * scale[:, :, None, None] + bias[:, :, None, None]
    od2 = torch.einsum("bdhw,dc->bchw", hed, m_out)
    return torch.exp(-od2)
