"""Batches from the packed arrays, and the preprocessing train and predict share.

:class:`PackedBatches` serves uint8 batches straight from the ``.npy`` array:
rows are gathered with one fancy index per batch (sorted, so reads from a
memory map stay sequential), never decoded per image. Arrays that fit
comfortably in memory are loaded once; larger ones are gathered from the memory
map batch by batch. Preprocessing (crop, resize, normalise) and augmentation are
tensor ops on the whole batch, on the model's device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hcd import env
from hcd.data.augment import AugmentConfig, augment_batch, crop_batch, to_device, to_float


@functools.lru_cache(maxsize=16)
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation constants on the device, made once (not a host-to-device copy per batch)."""
    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Preprocess:
    """How a model sees a patch: a centre crop, an optional resize, normalisation by the train statistics."""

    crop: int
    upscale: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch_u8: torch.Tensor, device: torch.device, augment: AugmentConfig | None = None, gen: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
        """(B, 96, 96, 3) uint8 -> (B, 3, S, S) float, normalised, on ``device``. Only the crop is made float."""
        x = batch_u8.to(device, non_blocking=True)
        if augment is not None:
            assert gen is not None
            x = augment_batch(x, augment, self.crop, gen)
        else:
            x = to_float(crop_batch(x.permute(0, 3, 1, 2), self.crop))
        if self.upscale and self.upscale != self.crop:
            x = F.interpolate(x, size=(self.upscale, self.upscale), mode="bilinear", align_corners=False, antialias=False)
        mean, std = _norm_tensors(self.mean, self.std, str(device))
        x = (x - mean) / std
        # the crop gather leaves NHWC strides: hand the model the layout it was set up for
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class PackedBatches:
    """uint8 batches of selected rows of a packed array, with their labels (see the module doc)."""

    def __init__(self, x: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None, device: torch.device | str = "cpu", mode: str | None = None) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        nbytes = len(self.rows) * int(np.prod(x.shape[1:]))
        self.mode = mode or self._choose(nbytes)
        self.x = x
        if self.mode == "host":
            order = np.argsort(self.rows, kind="stable")
            self.data = np.empty((len(self.rows), *x.shape[1:]), np.uint8)
            for s in range(0, len(order), 4096):  # sorted chunks: sequential reads
                sel = order[s : s + 4096]
                self.data[sel] = x[self.rows[sel]]
        elif self.mode == "device":
            # straight to the GPU in chunks through pinned memory, so the copies run while the next chunk is
            # gathered and the host never waits for the device (a pageable copy synchronises: tests/test_gpu.py)
            self.gpu = torch.empty((len(self.rows), *x.shape[1:]), dtype=torch.uint8, device=self.device)
            for s in range(0, len(self.rows), 8192):
                chunk = torch.from_numpy(np.ascontiguousarray(x[self.rows[s : s + 8192]]))
                self.gpu[s : s + len(chunk)].copy_(chunk.pin_memory() if self.device.type == "cuda" else chunk, non_blocking=True)
            self.gpu_labels = None if self.labels is None else to_device(torch.from_numpy(self.labels), self.device)

    def _choose(self, nbytes: int) -> str:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes <= env.gpu_data_fraction() * free:  # of free GPU memory, for resident data
                return "device"
        return "host" if nbytes <= env.in_memory_bytes() else "stream"  # load the rows if smaller

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``idx`` (positions in this selection) as a uint8 (B, 96, 96, 3) tensor, and their labels.
        GPU-resident data takes ``idx`` as a tensor on the GPU (``batches`` copies an epoch's order once)."""
        if self.mode == "device":
            i = idx if isinstance(idx, torch.Tensor) else to_device(torch.from_numpy(np.asarray(idx, dtype=np.int64)), self.device)
            return self.gpu[i], None if self.gpu_labels is None else self.gpu_labels[i]
        if self.mode == "host":
            batch = self.data[idx]
        else:
            src = self.rows[idx]
            order = np.argsort(src, kind="stable")
            batch = np.empty((len(idx), *self.x.shape[1:]), np.uint8)
            batch[order] = self.x[src[order]]  # sorted gather: sequential reads of the memory map
        t = torch.from_numpy(batch)
        y = None if self.labels is None else torch.from_numpy(self.labels[idx])
        if self.device.type == "cuda":  # pinned, so the copy to the GPU overlaps compute
            t = t.pin_memory()
            y = None if y is None else y.pin_memory()
        return t, y

    def batches(self, batch_size: int, gen: torch.Generator | None = None, drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches in ``gen``'s order. ``shard=(r, N)`` (data-parallel rank r of N, with ``drop_last``): of every
        batch of ``batch_size`` rows, the r-th of N equal slices — the N ranks together see exactly this batch."""
        n = len(self)
        order = torch.randperm(n, generator=gen).numpy() if gen is not None else np.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        rank, world = shard
        per = batch_size // world
        lo, hi = rank * per, (rank + 1) * per  # of each batch; all of it without sharding
        if self.mode == "device":  # the epoch's order goes to the GPU once; each batch is a slice of it there
            order_t = to_device(torch.from_numpy(order), self.device)
            for start in range(0, stop, batch_size):
                yield self.gather(order_t[start : start + batch_size][lo:hi])
            return
        for start in range(0, stop, batch_size):
            yield self.gather(order[start : start + batch_size][lo:hi])
