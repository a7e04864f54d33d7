"""The device a model runs on, its precision, the CPU threads, and the out-of-memory message."""

from __future__ import annotations

import torch

from hcd import env


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU (``HCD_DEVICE`` overrides)."""
    name = requested or env.env_device()
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (with a grad scaler); None on CPU (fp32, bit-reproducible)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def set_threads(share: int = 1) -> int:
    """Use every core this process may run on (cgroup/affinity aware; ``HCD_THREADS`` overrides), once;
    ``share`` processes on one machine (data-parallel ranks) split them."""
    n = env.threads() if share == 1 or env.env_int("HCD_THREADS", None, 1, 4096) else max(1, env.cpu_count() // share)
    torch.set_num_threads(n)
    return n


def oom_message(what: str, device: torch.device, batch_size: int, key: str, note: str = "") -> str:
    """One line for an out-of-memory error: the batch size that failed and a smaller one to try."""
    where = str(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where += f" ({total / 2**30:.0f} GiB, {free / 2**30:.1f} GiB free now)"
    return f"{what}: out of GPU memory on {where} at batch size {batch_size}; set {key} to {max(1, batch_size // 2)} or lower{note}"
