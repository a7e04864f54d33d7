"""The training hot loop, shared by the train stage and the speed benchmark."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hcd.data.augment import AugmentConfig
from hcd.data.batches import PackedBatches, Preprocess
from hcd.errors import HcdError
from hcd.runtime import distributed
from hcd.runtime.device import autocast_dtype


@dataclass
class Trainer:
    """Everything one training step needs besides the batch: built once per run."""

    model: torch.nn.Module  # the parameters (and train/eval mode)
    fwd: torch.nn.Module  # what runs the forward pass: the model, or its torch.compile'd wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    prep: Preprocess
    aug: AugmentConfig
    gen_order: torch.Generator  # batch order
    gen_aug: torch.Generator  # augmentation draws
    batch_size: int
    device: torch.device
    name: str = "model"  # for messages and the progress bar
    epochs: int = 1  # for the progress bar
    scaler: torch.amp.GradScaler | None = None
    pos_weight: torch.Tensor | None = None
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)  # data-parallel: this process's rank
    channels_last: bool = field(init=False)
    check_each_step: bool = field(init=False)  # the loss read back every step (CPU); else once per epoch (GPU)

    def __post_init__(self) -> None:
        self.channels_last = self.device.type == "cuda"
        self.check_each_step = self.device.type == "cpu"
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)


def train_steps(t: Trainer, source: PackedBatches, epoch: int, max_steps: int | None = None, progress: bool = True, on_step=None) -> tuple[float, int]:
    """One epoch (or ``max_steps`` steps) of the hot loop; returns (summed loss, patches seen).

    Per step: one gather from the packed array (or the GPU-resident copy), batched
    augmentation and normalisation on the device, autocast forward, backward, step.
    On a GPU nothing in the loop waits for the device: the loss, the first non-finite
    step and its loss are kept there and read back once, after the epoch (:func:`run_steps`);
    on the CPU the loss is checked every step. Either way a non-finite loss stops training
    with the same message (:func:`non_finite`): its value, epoch, step and learning rate.
    ``on_step(step, lr, loss)`` (the lr finder's hook; it syncs every step) runs before the
    finite-loss check and stops the epoch when it returns False.
    """
    r = run_steps(t, source, epoch, max_steps, progress, on_step)
    losses, seen, first_bad = r.losses, r.seen, r.first_bad
    if t.ranks.on:  # every rank's share: the loss of the global batches, and the first bad step on any rank
        losses = distributed.all_sum(losses)
        seen = int(distributed.all_sum(torch.tensor(seen, device=losses.device)))
        first_bad = distributed.all_max(first_bad)
        distributed.sync_buffers(t.model)  # every rank validates and saves the same model
    total = float(losses)  # the epoch's one read-back
    bad = int(first_bad)
    if bad >= 0:
        loss = float(r.bad_loss) if int(r.first_bad) == bad else math.nan  # another rank's: its value stayed there
        raise HcdError(non_finite(t.name, loss, epoch, bad, r.lrs[bad]))
    if not math.isfinite(total):  # a step's loss was finite but the sum overflowed: name the epoch
        raise HcdError(f"train {t.name}: the summed loss of epoch {epoch + 1} is {total} (lr {t.opt.param_groups[0]['lr']:.3g}) — lower lr or check the data; model not written")
    return total, seen


def non_finite(name: str, loss: float, epoch: int, step: int, lr: float) -> str:
    """The one message for a non-finite loss, on every device (``epoch`` and ``step`` from 0)."""
    return f"train {name}: loss is {loss} at epoch {epoch + 1}, step {step + 1}, lr {lr:.3g} — lower lr or check the data; model not written"


@dataclass
class Steps:
    """What :func:`run_steps` returns; the tensors stay on the device until the caller reads them."""

    losses: torch.Tensor  # summed over the patches seen, float64
    seen: int
    first_bad: torch.Tensor  # the first step with a non-finite loss, or -1
    bad_loss: torch.Tensor  # that step's loss (nan or inf)
    lrs: list[float]  # the learning rate of each step taken


def run_steps(t: Trainer, source: PackedBatches, epoch: int, max_steps: int | None = None, progress: bool = True, on_step=None) -> Steps:
    """The steps of one epoch without a host-device synchronisation on a GPU (tests/test_gpu.py runs it
    under ``torch.cuda.set_sync_debug_mode("error")``)."""
    from tqdm import tqdm

    dtype = autocast_dtype(t.device)
    t.model.train()
    n_steps = len(source) // t.batch_size
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)
    losses = torch.zeros((), device=t.device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=t.device, dtype=torch.int64)
    bad_loss = torch.zeros((), device=t.device)
    lrs: list[float] = []
    seen = 0
    bar = tqdm(total=n_steps * t.batch_size, unit="patch", unit_scale=True, desc=f"{t.name} epoch {epoch + 1}/{t.epochs}", file=sys.stderr, mininterval=2.0, disable=None if progress and t.ranks.main else True)
    for step, (xb, yb) in enumerate(source.batches(t.batch_size, t.gen_order, drop_last=True, shard=(t.ranks.rank, t.ranks.world))):
        if step >= n_steps:
            break
        lr = t.opt.param_groups[0]["lr"]
        xin = t.prep(xb, t.device, t.aug, t.gen_aug, t.channels_last)
        y = yb.to(t.device, non_blocking=True).view(-1, 1)
        with torch.autocast(t.device.type, dtype=dtype, enabled=dtype is not None):
            logit = t.fwd(xin).float()
        loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=t.pos_weight)
        if on_step is not None and not on_step(step, lr, float(loss.detach())):
            break
        lrs.append(lr)
        if t.check_each_step:
            if not torch.isfinite(loss):
                raise HcdError(non_finite(t.name, loss.item(), epoch, step, lr))
        else:  # recorded on the device, read after the epoch
            new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
            first_bad = torch.where(new_bad, step, first_bad)
            bad_loss = torch.where(new_bad, loss.detach(), bad_loss)
        t.opt.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
        t.sched.step()
        losses += loss.detach().double() * len(y)
        seen += len(y)
        bar.update(len(y) * t.ranks.world)
    bar.close()
    return Steps(losses, seen, first_bad, bad_loss, lrs)
