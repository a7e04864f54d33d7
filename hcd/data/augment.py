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
    """Crop ``crop`` px around the centre of every image of a (B, C, H, W) batch; ``shift`` (B, 2) moves each
    window (clamped)."""
    if shift is None or crop == x.shape[-1]:
        top = centre_window(x.shape[-1], crop)
        return x[:, :, top : top + crop, top : top + crop] if crop < x.shape[-1] else x
    rows, cols = window_index(x.shape[-1], crop, shift, None, x.device)
    return take(x.permute(0, 2, 3, 1), rows, cols)


@functools.lru_cache(maxsize=16)
def _dihedral_maps(crop: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 8 symmetries k, the (row, col) inside the crop that each output pixel of
    ``dihedral(crop, k)`` comes from: (8, crop, crop) each, made by applying :func:`dihedral` to an index grid."""
    grid = torch.arange(crop * crop).view(crop, crop)
    maps = torch.stack([dihedral(grid, k) for k in range(8)])
    return to_device(maps // crop, torch.device(device)), to_device(maps % crop, torch.device(device))


def window_index(size: int, crop: int, shift: torch.Tensor | None, ks: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows and columns, (B or 1, crop, crop), of a centre crop moved by ``shift`` (B, 2; clamped to the
    image) and turned by the dihedral symmetry ``ks`` (B,): the whole geometry of a batch as one gather."""
    top = centre_window(size, crop)
    r, c = _dihedral_maps(crop, str(device))
    r, c = (r[ks], c[ks]) if ks is not None else (r[:1], c[:1])  # map 0 is the identity
    if shift is None:
        return r + top, c + top
    oy = (top + shift[:, 0]).clamp(0, size - crop)
    ox = (top + shift[:, 1]).clamp(0, size - crop)
    return r + oy[:, None, None], c + ox[:, None, None]


def take(x_nhwc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[b, :, i, j] = x[b, rows[b, i, j], cols[b, i, j], :]``: (B, H, W, C) -> (B, C, h, w), any dtype."""
    bidx = torch.arange(x_nhwc.shape[0], device=x_nhwc.device)[:, None, None]
    return x_nhwc[bidx, rows, cols].permute(0, 3, 1, 2)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; a float batch as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A CPU tensor (random draws, indices) on ``dev``: on CUDA through pinned memory, so the copy
    is asynchronous — a pageable copy would make the host wait every step; on the CPU, itself."""
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def draw(cfg: AugmentConfig, b: int, size: int, crop: int, gen: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    """Every random number of one batch's augmentation, drawn from ``gen`` on the CPU in a fixed order (so CPU
    and GPU runs draw the same values), then sent to ``dev`` as one copy: one transfer per step, not one per op."""
    out: dict[str, torch.Tensor] = {}

    def uniform(key: str, *shape: int, lo: float, hi: float) -> None:
        out[key] = torch.rand(*shape, generator=gen) * (hi - lo) + lo

    if cfg.shift_px > 0 and crop < size:
        out["shift"] = torch.randint(-cfg.shift_px, cfg.shift_px + 1, (b, 2), generator=gen)
    if cfg.rotate_deg > 0:
        uniform("angle", b, lo=-cfg.rotate_deg, hi=cfg.rotate_deg)
    if cfg.dihedral:
        out["k"] = torch.randint(0, 8, (b,), generator=gen)
    if cfg.hed_jitter > 0:
        uniform("hed_scale", b, 3, lo=1 - cfg.hed_jitter, hi=1 + cfg.hed_jitter)
        uniform("hed_bias", b, 3, lo=-cfg.hed_jitter / 10, hi=cfg.hed_jitter / 10)
    if cfg.brightness > 0:
        uniform("brightness", b, 1, 1, 1, lo=1 - cfg.brightness, hi=1 + cfg.brightness)
    if cfg.contrast > 0:
        uniform("contrast", b, 1, 1, 1, lo=1 - cfg.contrast, hi=1 + cfg.contrast)
    if dev.type != "cuda" or not out:
        return out
    # float64 holds every float32 draw and every small integer exactly
    packed = to_device(torch.cat([v.reshape(b, -1).double() for v in out.values()], 1), dev)
    got, col = {}, 0
    for key, v in out.items():
        w = v[0].numel()
        got[key] = packed[:, col : col + w].reshape(v.shape).to(v.dtype)
        col += w
    return got


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random training augmentation of a batch — (B, H, W, 3) uint8 as packed, or (B, 3, H, W) float in [0, 1] —
    to (B, 3, crop, crop) float in [0, 1].

    The shifted crop and the dihedral turn are one gather of the uint8 pixels (only the crop is ever made float);
    a small rotation, when asked for, resamples the whole image first. All random numbers come from ``gen``
    (:func:`draw`).
    """
    nhwc = x.dtype == torch.uint8
    b, size = x.shape[0], x.shape[-2]
    d = draw(cfg, b, size, crop, gen, x.device)
    if "angle" in d:
        xf = to_float(x.permute(0, 3, 1, 2)) if nhwc else x
        ang = d["angle"] * math.pi / 180
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(theta.to(xf.dtype), list(xf.shape), align_corners=False)
        x, nhwc = F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False), False
    rows, cols = window_index(size, crop, d.get("shift"), d.get("k"), x.device)
    x = to_float(take(x if nhwc else x.permute(0, 2, 3, 1), rows, cols))
    if "hed_scale" in d:
        x = hed_jitter(x, d["hed_scale"], d["hed_bias"])
    if "brightness" in d:
        x = x * d["brightness"]
    if "contrast" in d:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * d["contrast"] + mean
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
