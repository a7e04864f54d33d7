"""Seeds and determinism: on the CPU, two runs with the same seed give bit-identical weights."""

from __future__ import annotations

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every generator. ``deterministic`` (``train.deterministic``): on CUDA, true keeps reruns bit-identical
    (deterministic kernels, no cuDNN autotuning); false lets cuDNN time its algorithms per shape and pick the fastest
    (``cudnn.benchmark``) and allows non-deterministic kernels and TF32 matrix products. The CPU is deterministic
    either way."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
