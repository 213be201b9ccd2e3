"""Host measurements: CPU load and memory (psutil), GPU utilisation (NVML, where present)."""

from __future__ import annotations

import logging
from typing import Any

import psutil

log = logging.getLogger(__name__)


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # pynvml raises its own NVMLError family, or ImportError
        return None
    return pynvml


def gpu_count() -> int:
    """How many GPUs NVML reports; 0 without a driver."""
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def detect_tier() -> str:
    """``gpu`` when NVML reports a device, else ``cpu``."""
    return "gpu" if gpu_count() > 0 else "cpu"


def cpu_load() -> float:
    """CPU use since the previous call, as a fraction 0-1."""
    return min(max(psutil.cpu_percent(interval=None) / 100.0, 0.0), 1.0)


def available_memory() -> str:
    """Available memory as the design writes it, e.g. ``24.5GB``."""
    return f"{psutil.virtual_memory().available / 1e9:.1f}GB"


def gpu_utilization() -> float | None:
    """Mean utilisation of all GPUs in percent, or ``None`` without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        rates = [
            nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i)).gpu
            for i in range(count)
        ]
    except Exception as exc:
        log.debug("NVML utilisation failed: %s", exc)
        return None
    return float(sum(rates)) / len(rates)
