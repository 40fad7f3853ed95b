"""Speed and memory of asbnn, measured in one run on one machine.

    python benchmarks/bench.py [--models resnet20 lenet5 ...] [--repeats 5] [--out benchmarks/results]

Times are medians over `--repeats` after warm-up. Writes `<out>/<machine>.json` and `.md`:
training step time, images/s, FLOPs, achieved FLOP/s (against a large matmul on the same machine,
and the spec sheet for known GPUs) and peak GPU memory for deterministic, VI, VI + AS (N = 5) and
free AS per model, with the ratio to deterministic; the same steps before and after each speed
setting (bf16, channels_last, torch.compile); sampled-model evaluation (batched vs loop vs the fast
evaluation of `asbnn eval --amp`, extrapolated to 100 samples x 10,000 images from a measured
slice); data-pipeline throughput against the ResNet-20 step; how an AS step grows with batch size
and N; the CPU features seen (AMX, AVX-512 bf16, AVX2), what the precision policy (`amp: auto`)
measures and picks per model, and the machine's load average (timings under load are contended).
`--eval-only` measures the policy and the evaluation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from asbnn.adversarial import ASConfig, FreeAdversarialSampler, bayes_loss
from asbnn.data import ArrayDataset, DeviceLoader, eval_loader
from asbnn.evaluate import sampled_predictions
from asbnn.models import create_model
from asbnn.posterior import Posterior
from asbnn.hardware import Workload, bf16_native, choose_precision, cpu_features, measure

SHAPES = {"lenet5": (1, 28), "resnet20": (3, 32), "resnet56": (3, 32), "vgg16_bn": (3, 32)}
METHODS = ("deterministic", "vi", "as", "free_as")

#: Dense peak TFLOP/s from the vendors' spec sheets (bf16 tensor cores, fp32 without tensor cores).
SPEC_PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756.0, "fp32": 51.2}, "H100": {"bf16": 989.4, "fp32": 66.9},
                    "H200": {"bf16": 989.4, "fp32": 66.9}, "A100": {"bf16": 312.0, "fp32": 19.5}}


@dataclass(frozen=True)
class Setting:
    """How a step runs: numeric precision, memory layout of the images, torch.compile or eager."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
        return " + ".join(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[Any, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int = 2) -> dict[Any, float]:
    """Median seconds of each function, timed in rounds of one call each: the machine's slow drifts
    (other tenants of a shared VM) then hit every method alike, so their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    return interleaved_medians({"only": fn}, device, repeats, warmup)["only"]


def step_functions(model_name: str, batch: int, device: torch.device, steps: int = 5,
                   setting: Setting = Setting(), methods: tuple[str, ...] = METHODS) -> dict[str, Callable]:
    """One optimiser step of each training method on a fixed random batch, as the training loop runs it."""
    channels, size = SHAPES[model_name]
    x = torch.randn(batch, channels, size, size, device=device)
    if setting.channels_last and channels > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    det = create_model(model_name, in_channels=channels).to(device).train()
    post = Posterior(create_model(model_name, in_channels=channels)).to(device).train()
    opt_det = torch.optim.Adam(det.parameters(), lr=1e-3, fused=True)  # as asbnn's training loop
    opt_post = torch.optim.Adam(post.parameters(), lr=1e-3, fused=True)
    det_run, post_run = (torch.compile(det), torch.compile(post)) if setting.compile else (det, post)
    free = FreeAdversarialSampler(post_run, ASConfig(steps=steps))
    amp = setting.precision == "bf16"

    def run(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    losses = {
        "deterministic": (lambda: F.cross_entropy(det_run(x), y), opt_det),
        "vi": (lambda: bayes_loss(post_run, x, y, kl_weight=1e-5).total, opt_post),
        "as": (lambda: bayes_loss(post_run, x, y, kl_weight=1e-5, config=ASConfig(steps=steps)).total, opt_post),
        "free_as": (lambda: free.loss(x, y, kl_weight=1e-5).total, opt_post),
    }
    return {method: run(*losses[method]) for method in methods}


def count_flops(fn: Callable[[], None]) -> float:
    """Floating-point operations of one call (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak GPU memory (GiB) of one call after warm-up; None on a CPU, which keeps no such count."""
    if device.type != "cuda":
        return None
    fn()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def bench_steps(models: list[str], device: torch.device, repeats: int, setting: Setting,
                batch: int = 100) -> list[dict]:
    rows = []
    for name in models:
        flops = {method: count_flops(fn) for method, fn in step_functions(name, batch, device).items()}  # fp32 eager
        fns = step_functions(name, batch, device, setting=setting)
        times = interleaved_medians(fns, device, repeats)
        for method, seconds in times.items():
            rows.append({"model": name, "method": method, "batch": batch, "step_ms": 1000 * seconds,
                         "images_per_s": batch / seconds, "ratio": seconds / times["deterministic"],
                         "gflop_per_step": flops[method] / 1e9, "tflops": flops[method] / seconds / 1e12,
                         "peak_memory_gib": peak_memory(fns[method], device)})
        print(f"{name}: " + ", ".join(f"{m} {1000 * t:.1f} ms" for m, t in times.items()), flush=True)
    return rows


def bench_settings(model: str, device: torch.device, repeats: int, batch: int = 100) -> list[dict]:
    """Each speed setting alone, and all together, against the plain fp32 eager step (all timed interleaved)."""
    variants = [Setting(), Setting(channels_last=True), Setting(precision="bf16"), Setting(compile=True),
                Setting("bf16", channels_last=True, compile=True)]
    fns, first_s = {}, {}
    for setting in variants:
        steps = step_functions(model, batch, device, setting=setting, methods=("deterministic", "vi", "as"))
        began = time.perf_counter()
        for fn in steps.values():  # the first call compiles (when compiling): timed on its own
            fn()
        sync(device)
        first_s[setting.label] = time.perf_counter() - began
        fns.update({(setting.label, method): fn for method, fn in steps.items()})
    times = interleaved_medians(fns, device, repeats, warmup=1)
    rows = []
    for setting in variants:
        row = {f"{m}_ms": 1000 * times[(setting.label, m)] for m in ("deterministic", "vi", "as")}
        rows.append({"model": model, "setting": setting.label, "first_calls_s": first_s[setting.label], **row})
        print(f"{model} {setting.label}: " + ", ".join(f"{m} {t:.1f}" for m, t in row.items()), flush=True)
    return rows


def matmul_peak_tflops(device: torch.device, precision: str) -> float:
    """Achieved TFLOP/s of a large square matmul: the practical ceiling of this machine."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device, 5) / 1e12


def spec_peak_tflops(machine: str, precision: str) -> float | None:
    for name, peaks in SPEC_PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if name in machine:
            return peaks[precision]
    return None


def bench_eval(model: str, device: torch.device, repeats: int, images: int, samples: int,
               channels_last: bool = False) -> dict:
    """Time to evaluate sampled models on a slice, extrapolated to 100 samples x 10,000 images."""
    channels, size = SHAPES[model]
    rng = np.random.default_rng(0)
    data = ArrayDataset(images=rng.integers(0, 256, (images, size, size, channels), dtype=np.uint8),
                        labels=rng.integers(0, 10, images), classes=[str(i) for i in range(10)])
    loader = eval_loader(data, (0.5,) * channels, (0.25,) * channels, device=device, channels_last=channels_last)
    post = Posterior(create_model(model, in_channels=channels)).to(device).eval()
    big = DeviceLoader(data, min(2 * loader.batch_size, images), train=False, mean=(0.5,) * channels,
                       std=(0.25,) * channels, augment=False, device=device, channels_last=channels_last)
    # loop / batched: the exact fp32 evaluation; fast: `asbnn eval --amp` (BatchNorm folded, NHWC), in fp32
    # and, where native, bf16; fast_bf16_big: the same with batches twice as large
    variants = {"loop": (loader, dict(mode="loop")), "batched": (loader, dict(mode="batched")),
                "fast_fp32": (loader, dict(fast=True))}
    if bf16_native(device):
        variants |= {"fast_bf16": (loader, dict(fast=True, amp=True)), "fast_bf16_big": (big, dict(fast=True, amp=True))}
    seconds = interleaved_medians({name: (lambda data=data, kw=kw: sampled_predictions(post, data, samples, chunk=samples,
                                                                                      **kw))
                                   for name, (data, kw) in variants.items()}, device, repeats, warmup=1)
    out = {"model": model, "measured_samples": samples, "measured_images": images, "batch": loader.batch_size}
    out |= {f"{name}_s_for_100x10000": t * (100 / samples) * (10000 / images) for name, t in seconds.items()}
    out["batched_speedup"] = out["loop_s_for_100x10000"] / out["batched_s_for_100x10000"]
    return out


def bench_policy(models: list[str], device: torch.device) -> dict:
    """What `amp: auto` measures and picks for each model's default training step (VI, batch 100),
    and for ResNet-20's fast evaluation (`asbnn eval --amp`, batches of 500)."""
    out = {}
    for model in models:
        channels, size = SHAPES[model]
        post = Posterior(create_model(model, in_channels=channels)).to(device)
        out[f"{model} train"] = measure(post, Workload(model, (channels, size, size), 100, True), device)
    channels, size = SHAPES["resnet20"]
    post = Posterior(create_model("resnet20", in_channels=channels)).to(device)
    out["resnet20 eval"] = measure(post, Workload("resnet20", (channels, size, size), 500, True, "eval", True), device)
    return out


def bench_data(device: torch.device, repeats: int) -> dict:
    """Augmented CIFAR-shaped batches per second, without any model."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(images=rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                        labels=rng.integers(0, 10, 50000), classes=[str(i) for i in range(10)])
    loader = DeviceLoader(data, 100, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def epoch() -> None:
        for _ in loader.batches(gen):
            pass

    seconds = median_seconds(epoch, device, repeats, warmup=1)
    return {"batches_per_s": len(loader) / seconds, "ms_per_batch": 1000 * seconds / len(loader)}


def bench_scaling(device: torch.device, repeats: int, setting: Setting) -> list[dict]:
    rows = []
    for batch in (50, 100, 200):
        fns = step_functions("resnet20", batch, device, setting=setting, methods=("as",))
        rows.append({"batch": batch, "steps": 5, "as_step_ms": 1000 * median_seconds(fns["as"], device, repeats),
                     "peak_memory_gib": peak_memory(fns["as"], device)})
    for steps in (1, 3, 10):
        fns = step_functions("resnet20", 100, device, steps=steps, setting=setting, methods=("as",))
        rows.append({"batch": 100, "steps": steps, "as_step_ms": 1000 * median_seconds(fns["as"], device, repeats),
                     "peak_memory_gib": peak_memory(fns["as"], device)})
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU x{torch.get_num_threads()} threads"


def header(result: dict) -> list[str]:
    """The machine, what it has for bf16, and how busy it was."""
    load = result["load_average"]
    busy = " (other jobs shared the cores: read ratios, not absolute times)" if max(load.values()) > 1.5 else ""
    return [f"Machine: {result['machine']} ({', '.join(result['cpu_features']) or 'no AVX2'}), torch {result['torch']}, "
            f"{result['date']}. Load average {load['start']:.1f} at the start, {load['end']:.1f} at the end{busy}."]


def eval_lines(result: dict) -> list[str]:
    e = result["eval"]
    lines = ["", f"100 sampled {e['model']} models on 10,000 images (extrapolated from {e['measured_samples']} "
             f"samples x {e['measured_images']} images): loop {e['loop_s_for_100x10000']:.0f} s, batched (vmap) "
             f"{e['batched_s_for_100x10000']:.0f} s, batched speed-up {e['batched_speedup']:.2f}x; fast "
             f"(`eval --amp`: BatchNorm folded, NHWC) in fp32 {e['fast_fp32_s_for_100x10000']:.0f} s"
             + (f", in bf16 {e['fast_bf16_s_for_100x10000']:.0f} s (batches of {2 * e['batch']}: "
                f"{e['fast_bf16_big_s_for_100x10000']:.0f} s)" if "fast_bf16_s_for_100x10000" in e else "") + "."]
    lines += ["", "| precision policy (amp: auto) | bf16 ms | fp32 ms | cosine | picks |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {1000 * r['bf16_s']:.0f} | {1000 * r['fp32_s']:.0f} | {r['cosine']:.4f} | {r['precision']} |"
              for name, r in result["policy"].items()]
    return lines


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = header(result) + [f"Steps in {s}.",
             f"Peak for FLOP/s: a large matmul reaches {result['matmul_tflops']:.2f} TFLOP/s here"
             + (f" (spec sheet: {result['spec_tflops']:.0f})." if result.get("spec_tflops") else "."), "",
             "| model | method | step ms | images/s | x deterministic | GFLOP/step | TFLOP/s | % of matmul peak "
             "| peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["steps"]:
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['ratio']:.2f} | {r['gflop_per_step']:.1f} | {r['tflops']:.3f} | "
                     f"{100 * r['tflops'] / result['matmul_tflops']:.0f} | {memory} |")
    if result.get("settings"):
        lines += ["", "| model | setting | deterministic ms | VI ms | VI + AS ms | first calls s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['setting']} | {r['deterministic_ms']:.1f} | {r['vi_ms']:.1f} | {r['as_ms']:.1f} | "
                  f"{r['first_calls_s']:.1f} |" for r in result["settings"]]
    lines += eval_lines(result)
    d = result["data"]
    lines += ["", f"Data pipeline (augmented 100-image CIFAR batches, no model): {d['batches_per_s']:.0f} batches/s, "
              f"{d['ms_per_batch']:.2f} ms per batch"]
    steps = [r["step_ms"] for r in result["steps"] if r["model"] == "resnet20" and r["method"] == "deterministic"]
    if steps:
        lines[-1] += f" = {100 * d['ms_per_batch'] / steps[0]:.2f} % of a deterministic ResNet-20 step"
    lines[-1] += "."
    if result.get("scaling"):
        lines += ["", "| ResNet-20 AS: batch | N | step ms | peak GiB |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['steps']} | {r['as_step_ms']:.0f} | "
                  + ("-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}") + " |"
                  for r in result["scaling"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="of the main table's steps (default: bf16 where native, as `amp: true`)")
    parser.add_argument("--channels-last", action="store_true", help="main table: NHWC image batches")
    parser.add_argument("--compile", action="store_true", help="main table: torch.compile the networks")
    parser.add_argument("--settings-model", default="resnet20", choices=list(SHAPES),
                        help="model of the before/after table of precision, layout and compile")
    parser.add_argument("--no-settings", action="store_true", help="skip that table (it compiles: minutes)")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--eval-only", action="store_true", help="only the precision policy and the evaluation")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    # compile times as a first run pays them: not from a cache an earlier run left on disk
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="asbnn-bench-inductor-"))
    device = torch.device(args.device)
    precision = args.precision or choose_precision(device, amp=True)
    setting = Setting(precision, args.channels_last, args.compile)
    machine = machine_name(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = machine.replace(" ", "_").replace("/", "_")

    def save() -> None:  # after every section, so a run cut short by a time limit keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    result = {"machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "cpu_features": sorted(cpu_features()), "load_average": {"start": os.getloadavg()[0]},
              "policy": bench_policy(args.models, device)}
    if args.eval_only:
        result["eval"] = bench_eval("resnet20", device, args.repeats, args.eval_images, args.eval_samples)
        result["load_average"]["end"] = os.getloadavg()[0]
        (out / f"{stem}-eval.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}-eval.md").write_text("\n".join(header(result) + eval_lines(result)) + "\n")
        print((out / f"{stem}-eval.md").read_text())
        return
    result |= {"setting": setting.label, "matmul_tflops": matmul_peak_tflops(device, precision),
              "spec_tflops": spec_peak_tflops(machine, precision) if device.type == "cuda" else None,
              "steps": bench_steps(args.models, device, args.repeats, setting)}
    save()
    result["settings"] = [] if args.no_settings else bench_settings(args.settings_model, device, args.repeats)
    save()
    result["eval"] = bench_eval("resnet20", device, max(1, args.repeats // 2), args.eval_images, args.eval_samples,
                                args.channels_last)
    print(result["eval"], flush=True)
    result["data"] = bench_data(device, args.repeats)
    save()
    result["scaling"] = [] if args.no_scaling else bench_scaling(device, max(1, args.repeats // 2), setting)
    save()
    result["load_average"]["end"] = os.getloadavg()[0]
    save()
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))

if __name__ == "__main__":
    main()
