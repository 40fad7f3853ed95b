"""Speed and memory of asbnn, measured in one run on one machine.

    python benchmarks/bench.py [--models resnet20 lenet5 ...] [--repeats 5] [--out benchmarks/results]

Times are medians over `--repeats` after warm-up. Writes `<out>/<machine>.json` and `.md`:
training step time and images/s for deterministic, VI, VI + AS (N = 5) and free AS per model with
the ratio to deterministic; sampled-model evaluation (batched vs loop, extrapolated to 100 samples
x 10,000 images from a measured slice); data-pipeline throughput against the ResNet-20 step;
and how an AS step grows with batch size and N.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from asbnn.adversarial import ASConfig, FreeAdversarialSampler, bayes_loss
from asbnn.data import ArrayDataset, DeviceLoader
from asbnn.evaluate import predict
from asbnn.models import create_model
from asbnn.posterior import Posterior

SHAPES = {"lenet5": (1, 28), "resnet20": (3, 32), "resnet56": (3, 32), "vgg16_bn": (3, 32)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def step_functions(model_name: str, batch: int, device: torch.device, steps: int = 5) -> dict[str, Callable]:
    """One optimiser step of each training method on a fixed random batch."""
    channels, size = SHAPES[model_name]
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    det = create_model(model_name, in_channels=channels).to(device).train()
    post = Posterior(create_model(model_name, in_channels=channels)).to(device).train()
    opt_det = torch.optim.Adam(det.parameters(), lr=1e-3, fused=True)  # as asbnn's training loop
    opt_post = torch.optim.Adam(post.parameters(), lr=1e-3, fused=True)
    free = FreeAdversarialSampler(post, ASConfig(steps=steps))

    def run(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    return {
        "deterministic": run(lambda: F.cross_entropy(det(x), y), opt_det),
        "vi": run(lambda: bayes_loss(post, x, y, kl_weight=1e-5).total, opt_post),
        "as": run(lambda: bayes_loss(post, x, y, kl_weight=1e-5, config=ASConfig(steps=steps)).total, opt_post),
        "free_as": run(lambda: free.loss(x, y, kl_weight=1e-5).total, opt_post),
    }


def bench_steps(models: list[str], device: torch.device, repeats: int, batch: int = 100) -> list[dict]:
    rows = []
    for name in models:
        fns = step_functions(name, batch, device)
        times = {method: median_seconds(fn, device, repeats) for method, fn in fns.items()}
        for method, seconds in times.items():
            rows.append({"model": name, "method": method, "batch": batch, "step_ms": 1000 * seconds,
                         "images_per_s": batch / seconds, "ratio": seconds / times["deterministic"]})
        print(f"{name}: " + ", ".join(f"{m} {1000 * t:.1f} ms" for m, t in times.items()), flush=True)
    return rows


def bench_eval(model: str, device: torch.device, repeats: int, images: int, samples: int) -> dict:
    """Time to evaluate sampled models on a slice, extrapolated to 100 samples x 10,000 images."""
    channels, size = SHAPES[model]
    rng = np.random.default_rng(0)
    data = ArrayDataset(images=rng.integers(0, 256, (images, size, size, channels), dtype=np.uint8),
                        labels=rng.integers(0, 10, images), classes=[str(i) for i in range(10)])
    loader = DeviceLoader(data, min(500, images), train=False, mean=(0.5,) * channels, std=(0.25,) * channels,
                          augment=False, device=device)
    post = Posterior(create_model(model, in_channels=channels)).to(device).eval()
    out = {"model": model, "measured_samples": samples, "measured_images": images}
    for mode in ("loop", "batched"):
        seconds = median_seconds(lambda: predict(post, loader, samples, mode=mode, chunk=samples), device,
                                 repeats, warmup=1)
        out[f"{mode}_s_for_100x10000"] = seconds * (100 / samples) * (10000 / images)
    out["batched_speedup"] = out["loop_s_for_100x10000"] / out["batched_s_for_100x10000"]
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


def bench_scaling(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for batch in (50, 100, 200):
        fns = step_functions("resnet20", batch, device)
        rows.append({"batch": batch, "steps": 5, "as_step_ms": 1000 * median_seconds(fns["as"], device, repeats)})
    for steps in (1, 3, 10):
        fns = step_functions("resnet20", 100, device, steps=steps)
        rows.append({"batch": 100, "steps": steps, "as_step_ms": 1000 * median_seconds(fns["as"], device, repeats)})
    return rows


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU x{torch.get_num_threads()} threads"


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}, torch {result['torch']}, {result['date']}.", "",
             "| model | method | step ms | images/s | x deterministic |", "|---|---|---:|---:|---:|"]
    for r in result["steps"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['ratio']:.2f} |")
    e = result["eval"]
    lines += ["", f"100 sampled {e['model']} models on 10,000 images (extrapolated from {e['measured_samples']} "
              f"samples x {e['measured_images']} images): loop {e['loop_s_for_100x10000']:.0f} s, batched (vmap) "
              f"{e['batched_s_for_100x10000']:.0f} s, batched speed-up {e['batched_speedup']:.2f}x."]
    d = result["data"]
    lines += ["", f"Data pipeline (augmented 100-image CIFAR batches, no model): {d['batches_per_s']:.0f} batches/s, "
              f"{d['ms_per_batch']:.2f} ms per batch"]
    steps = [r["step_ms"] for r in result["steps"] if r["model"] == "resnet20" and r["method"] == "deterministic"]
    if steps:
        lines[-1] += f" = {100 * d['ms_per_batch'] / steps[0]:.2f} % of a deterministic ResNet-20 step"
    lines[-1] += "."
    if result.get("scaling"):
        lines += ["", "| ResNet-20 AS: batch | N | step ms |", "|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['steps']} | {r['as_step_ms']:.0f} |" for r in result["scaling"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"machine": machine_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "steps": bench_steps(args.models, device, args.repeats)}
    result["eval"] = bench_eval("resnet20", device, max(1, args.repeats // 2), args.eval_images, args.eval_samples)
    print(result["eval"], flush=True)
    result["data"] = bench_data(device, args.repeats)
    result["scaling"] = [] if args.no_scaling else bench_scaling(device, max(1, args.repeats // 2))
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result["machine"].replace(" ", "_").replace("/", "_")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
