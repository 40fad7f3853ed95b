"""Which device a run uses and what it computes in there: the one precision policy of asbnn.

Training steps (`amp` in the config), `asbnn eval --amp` and the benchmarks all ask
`choose_precision`. bf16 autocast is possible only where the hardware multiplies bf16 natively
(CUDA GPUs with bf16; CPUs with AMX or AVX-512 bf16); elsewhere it is emulated and never used.
`amp: true` takes bf16 wherever it is possible, `amp: false` never, and `amp: auto` (the default)
measures: one short step of the network at hand in bf16 and in fp32, bf16 kept only if it is
clearly faster and its result close to fp32's. Whether bf16 pays depends on the machine and on the network (small
convolutions on a CPU can be slower in bf16), so the answer is cached per machine and workload.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .fileio import atomic_write_text
from .posterior import Posterior

Precision = Literal["bf16", "fp32"]
Amp = bool | Literal["auto"]

#: Cosine between the bf16 and fp32 results of the measured step (the gradient of a training step,
#: the logits of an evaluation) below which bf16 is refused, however fast. Healthy bf16 steps
#: measured 0.89 (VGG-16-BN posterior at initialisation, random inputs) to 0.999 (docs/benchmarks.md),
#: well above what two training batches' gradients share; bf16 that breaks a step (overflow,
#: underflow, a faulty kernel) measures near 0 or NaN.
MIN_COSINE = 0.8
#: bf16 must be this much faster to be kept: within the timing noise, fp32's exact numbers win.
MIN_SPEEDUP = 1.05
ROUNDS = 3  # timed rounds per precision, interleaved, after one warm-up each


@dataclass(frozen=True)
class Workload:
    """What the measured decision depends on besides the machine (the cache key)."""

    model: str
    input_shape: tuple[int, ...]  # one input, e.g. (3, 32, 32)
    batch_size: int
    bayesian: bool
    task: Literal["train", "eval"] = "train"
    channels_last: bool = False


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


def cpu_features() -> frozenset[str]:
    """The CPU features that decide bf16 speed, named as /proc/cpuinfo flags: amx_bf16, avx512_bf16, avx2."""
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "avx2": "_is_avx2_supported"}  # torch's private probes: an absent one means no
    return frozenset(flag for flag, probe in checks.items() if getattr(torch.cpu, probe, lambda: False)())


def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (elsewhere bf16 is emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_features() & {"amx_bf16", "avx512_bf16"})


def machine(device: torch.device) -> str:
    """The device model and its bf16 features, e.g. 'Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16, avx2)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or f"{platform.machine()} CPU"
    return f"{name} ({', '.join(sorted(cpu_features())) or 'no AVX2'})"


def choose_precision(device: torch.device, amp: Amp, workload: Workload | None = None,
                     net: nn.Module | None = None) -> Precision:
    """What a run asking for `amp` computes in on `device`; `auto` needs the workload and its network."""
    if amp is False or not bf16_native(device):
        return "fp32"
    if amp is True:
        return "bf16"
    if workload is None or net is None:
        raise ValueError("amp='auto' measures a step: pass the workload and its network")
    key = json.dumps({"machine": machine(device), "torch": torch.__version__, **asdict(workload)}, sort_keys=True)
    known = _read_cache().get(key)
    if known is None:
        known = measure(net, workload, device)
        _write_cache({**_read_cache(), key: known})  # measuring takes seconds: keep what others wrote meanwhile
    return known["precision"]


def can_resume(device: torch.device, amp: Amp, precision: Precision) -> bool:
    """Whether this machine continues, in the same precision, a run that trained in `precision`: a
    run never switches. `auto` keeps what its first epoch chose, bf16 only where it is native."""
    if amp == "auto":
        return precision == "fp32" or bf16_native(device)
    return precision == choose_precision(device, amp)


def measure(net: nn.Module, workload: Workload, device: torch.device) -> dict[str, float | str]:
    """Time one step of a copy of `net` in bf16 and in fp32 (interleaved rounds, median) on random
    inputs, and compare their results; `net`, its statistics and the global random state are untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws, e.g.
        step = _probe(net, workload, device)
        cosine = float(F.cosine_similarity(step(True).double(), step(False).double(), dim=0))  # also the warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(ROUNDS):
            for bf16 in times:
                times[bf16].append(time_step(step, bf16, device))
    bf16_s, fp32_s = statistics.median(times[True]), statistics.median(times[False])
    precision: Precision = "bf16" if bf16_s * MIN_SPEEDUP < fp32_s and cosine >= MIN_COSINE else "fp32"
    return {"precision": precision, "bf16_s": bf16_s, "fp32_s": fp32_s, "cosine": cosine,
            "measured": time.strftime("%Y-%m-%d %H:%M")}


def time_step(step: Callable[[bool], Tensor], bf16: bool, device: torch.device) -> float:
    """Seconds one call of `step` takes (the device synchronised)."""
    began = time.perf_counter()
    step(bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def _probe(net: nn.Module, workload: Workload, device: torch.device) -> Callable[[bool], Tensor]:
    """The measured step: a training step's gradient, or an evaluation's logits, at fixed inputs and
    (for a posterior) fixed weight noise, as a flat vector."""
    net = copy.deepcopy(net).train(workload.task == "train")
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(workload.batch_size, *workload.input_shape, generator=generator, device=device)
    if workload.channels_last and x.dim() == 4 and x.shape[1] > 1:  # as the loaders lay batches out
        x = x.contiguous(memory_format=torch.channels_last)
    eps = net.sample_eps(generator) if isinstance(net, Posterior) else None
    forward = (lambda: net(x, eps)) if eps is not None else (lambda: net(x))
    with torch.no_grad():
        classes = forward().shape[-1]
    y = torch.randint(0, classes, (workload.batch_size,), generator=generator, device=device)
    params = [p for p in net.parameters() if p.requires_grad]

    def step(bf16: bool) -> Tensor:
        if workload.task == "eval":
            with torch.no_grad(), autocast(device, bf16):
                return forward().float().flatten()
        with autocast(device, bf16):
            loss = F.cross_entropy(forward(), y)
        return torch.cat([g.flatten().float() for g in torch.autograd.grad(loss, params)])

    return step


def cache_path() -> Path:
    """Measured decisions: `$ASBNN_PRECISION_CACHE`, else precision.json in the user's cache folder."""
    if "ASBNN_PRECISION_CACHE" in os.environ:
        return Path(os.environ["ASBNN_PRECISION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asbnn" / "precision.json"


def _read_cache() -> dict[str, dict]:
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure again
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict[str, dict]) -> None:
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path(), json.dumps(cache, indent=1, sort_keys=True))
    except OSError:  # a read-only home: the decision holds for this run, and is measured again next time
        pass


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on `device` when `enabled` (a "bf16" decision), else a no-op context."""
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
