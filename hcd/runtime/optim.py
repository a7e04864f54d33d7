"""Optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch

from hcd.pipeline.params import TrainParams


def make_optimizer(model: torch.nn.Module, cfg: TrainParams, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    fused = not cfg.deterministic and all(p.is_cuda for p in model.parameters())  # one kernel for every parameter
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainParams, lr: float, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and total >= 4:  # each phase needs two steps or more (torch divides by its length)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=max(0.25, 2 / total), div_factor=25.0, final_div_factor=1e3)
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
