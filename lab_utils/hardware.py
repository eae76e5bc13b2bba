"""What this machine is: the GPU table, detection, bf16, device memory, and freeing it.

The only module that asks `torch.cuda` about the device. `import lab_utils.hardware` needs no torch;
the functions that read the device import it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import problem

GIB = 2**30


def bf16_capable(capability: tuple[int, int] | None = None) -> bool:
    """Return True when the GPU (CUDA device 0, or the given compute capability) has native bf16: capability >= 8.0.

    The one bf16 decision: torch.cuda.is_bf16_supported() is not asked, since in torch 2.13 it counts
    emulation and says True on a T4 (7.5), where bf16 is slow and training uses fp16.
    """
    if capability is None:
        import torch

        if not torch.cuda.is_available():
            return False
        capability = tuple(torch.cuda.get_device_capability(0))
    return tuple(capability) >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    """One training device: its kind, name, total memory in GiB, CUDA capability and bf16 support."""

    kind: str  # "cuda" | "cpu" | "mps"
    name: str  # "Tesla T4", "NVIDIA A100-SXM4-40GB", "cpu"
    memory_gib: float  # total device memory; system RAM for cpu/mps
    capability: tuple[int, int] | None  # (7, 5) for a T4; None off CUDA
    bf16: bool  # capability >= (8, 0)


# Memory is what torch.cuda.get_device_properties(0).total_memory reports, in GiB.
_GPUS: dict[str, Hardware] = {
    "T4": Hardware("cuda", "Tesla T4", 14.75, (7, 5), False),
    "V100": Hardware("cuda", "Tesla V100-SXM2-16GB", 15.78, (7, 0), False),
    "L4": Hardware("cuda", "NVIDIA L4", 21.96, (8, 9), True),
    "A100-40GB": Hardware("cuda", "NVIDIA A100-SXM4-40GB", 39.56, (8, 0), True),
    "A100-80GB": Hardware("cuda", "NVIDIA A100-SXM4-80GB", 79.15, (8, 0), True),
    "H100": Hardware("cuda", "NVIDIA H100 80GB HBM3", 79.19, (9, 0), True),
}
KNOWN_GPU_NAMES = (*_GPUS, "cpu")


def _system_ram_gib() -> float:
    """Return total system RAM in GiB (8.0 where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 2)
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return 8.0


def detect_hardware() -> Hardware:
    """Return the Hardware this process would train on: CUDA device 0, else Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        return Hardware(
            kind="cuda",
            name=props.name,
            memory_gib=round(props.total_memory / GIB, 2),
            capability=(major, minor),
            bf16=bf16_capable((major, minor)),
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Hardware("mps", "mps", _system_ram_gib(), None, False)
    return Hardware("cpu", "cpu", _system_ram_gib(), None, False)


def hardware_from_name(gpu: str) -> Hardware:
    """Return the Hardware for a GPU name such as "T4", "a100", "NVIDIA A100-SXM4-80GB" or "cpu"."""
    key = re.sub(r"[^a-z0-9]", "", str(gpu).lower())
    key = re.sub(r"^(nvidia|tesla)+", "", key)
    if key == "cpu":
        return Hardware("cpu", "cpu", _system_ram_gib(), None, False)
    if key.startswith("a100"):
        return _GPUS["A100-80GB" if "80" in key[4:] else "A100-40GB"]
    for prefix, name in (("h100", "H100"), ("v100", "V100")):
        if key.startswith(prefix):
            return _GPUS[name]
    if key in ("t4", "l4"):
        return _GPUS[key.upper()]
    raise problem(
        "unknown GPU name",
        got=repr(gpu),
        fix=f"use one of {', '.join(KNOWN_GPU_NAMES)} (any case; 'A100' means A100-40GB), or auto for this machine",
    )


def cuda_available() -> bool:
    """Return True when a CUDA GPU is visible to torch."""
    import torch

    return torch.cuda.is_available()


def free_memory() -> None:
    """Give back the memory of objects the caller has just dropped: a garbage collection, then CUDA's cache."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
