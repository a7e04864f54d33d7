"""hcd's environment variables, each parsed in one place with a one-line error.

==========================  =====================================================
``HCD_THREADS``             torch threads (default: the CPUs this process may use)
``HCD_WORKERS``             scan's decode processes (default: CPUs, at most 8)
``HCD_DEVICE``              ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: the best there is)
``HCD_IN_MEMORY_BYTES``     load selected rows into memory below this size (default 4 GiB)
``HCD_GPU_DATA_FRACTION``   keep data on the GPU when it takes at most this share of free memory
==========================  =====================================================

A malformed value (``HCD_THREADS=abc``) stops the command with
``HCD_THREADS='abc': expected a whole number from 1 to 4096`` instead of a traceback.
"""

from __future__ import annotations

import os
import re

from hcd.errors import HcdError, excerpt


def env_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise HcdError(f"{name}={excerpt(raw)}: expected a whole number from {lo} to {hi}")
    return value


def env_float(name: str, default: float, lo: float, hi: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # nan fails both comparisons
        raise HcdError(f"{name}={excerpt(raw)}: expected a number from {lo} to {hi}")
    return value


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d{1,2})?)$")


def env_device() -> str | None:
    raw = os.environ.get("HCD_DEVICE", "").strip()
    if not raw:
        return None
    if not _DEVICE_RE.match(raw):
        raise HcdError(f"HCD_DEVICE={excerpt(raw)}: expected cpu, cuda, cuda:N or mps")
    return raw


def cpu_count() -> int:
    """CPUs this process may run on (cgroup/affinity aware)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads() -> int:
    return env_int("HCD_THREADS", cpu_count(), 1, 4096)  # type: ignore[return-value]


def workers() -> int:
    return env_int("HCD_WORKERS", max(1, min(8, cpu_count())), 1, 256)  # type: ignore[return-value]


def in_memory_bytes() -> int:
    return env_int("HCD_IN_MEMORY_BYTES", 4 * 2**30, 0, 2**50)  # type: ignore[return-value]


def gpu_data_fraction() -> float:
    return env_float("HCD_GPU_DATA_FRACTION", 0.5, 0.0, 0.95)


def environment() -> dict[str, str | None]:
    """The software and machine a result came from: recorded in model.json and metrics/metrics.json.

    Bit-identical results need the same versions and the same kind of device
    (README, *Same numbers as the README*); this says which were used.
    """
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": version("torch"), "timm": version("timm"), "numpy": version("numpy"), "scikit-learn": version("scikit-learn"), "cpu": cpu}
