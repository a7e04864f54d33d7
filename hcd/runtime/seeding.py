"""Seeds and determinism: on the CPU, two runs with the same seed give bit-identical weights."""

from __future__ import annotations

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False
