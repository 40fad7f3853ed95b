"""Which device a run uses and what it computes in there: the one precision policy of asbnn.

Training steps, `asbnn eval --amp` and the benchmarks all ask `use_amp` whether bf16 autocast is
on: only with native bf16 matmuls (CUDA GPUs that support bf16, CPUs with AMX); elsewhere bf16 is
emulated, slower than fp32, and is not used.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from typing import Literal

import torch

from .errors import ConfigError

Precision = Literal["bf16", "fp32"]


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return device


def use_amp(device: torch.device, amp: bool) -> bool:
    """Whether a run asking for `amp` computes in bf16 autocast on `device`."""
    if not amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent means no
    return device.type == "cpu" and amx is not None and amx()


def step_precision(device: torch.device, amp: bool) -> Precision:
    """What a run asking for `amp` computes in on `device`: "bf16" or "fp32"."""
    return "bf16" if use_amp(device, amp) else "fp32"


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on `device` when `enabled` (a `use_amp` answer), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def require_compiler(device: torch.device) -> None:
    """torch.compile on a CPU calls a C++ compiler; say so before any work starts, not deep in Inductor."""
    compiler = os.environ.get("CXX", "g++")  # the one torch.compile's CPU backend calls
    if device.type == "cpu" and not shutil.which(compiler):
        raise ConfigError(f"compile: true on a CPU needs the C++ compiler {compiler} ($CXX, else g++); install "
                          "it or set compile: false")


def use_deterministic_kernels() -> None:
    """Deterministic GPU kernels (slower); CPU runs are bitwise repeatable without them."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable sums
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
