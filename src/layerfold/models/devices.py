"""Facts about the device a number was measured on: its name, its bf16 peak (for MFU), peak memory."""

from __future__ import annotations

import platform
import resource

import torch

# Dense bf16 tensor-core peaks (FLOP/s) used for MFU; a device not listed reports no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def library_versions() -> dict[str, str | None]:
    """The versions a measured number depends on (recorded beside every metric and benchmark)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "transformers": installed("transformers"), "lm_eval": installed("lm_eval")}


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak of the device called ``name`` (:func:`device_name`), or None when unknown."""
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(flops: float, seconds: float, name: str) -> float | None:
    """Model FLOP utilisation against the device's dense bf16 peak (None where the peak is unknown)."""
    peak = peak_flops(name)
    return round(flops / seconds / peak, 4) if peak and seconds > 0 else None


def host_peak_rss_mib() -> float:
    """The process's peak resident set size (Linux ru_maxrss is in KiB): a high-water mark, never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
