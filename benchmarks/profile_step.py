"""Where the time of one training step goes: torch.profiler's operator table for each method.

    python benchmarks/profile_step.py MODEL [METHOD ...] [--precision bf16] [--rows 22]

MODEL is one of bench.py's (lenet5, resnet20, resnet56, vgg16_bn); METHODs are deterministic, vi,
as, free_as (default: all). The step is bench.py's, batch 100, after two warm-up calls.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench import METHODS, SHAPES, Setting, step_functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=list(SHAPES))
    parser.add_argument("methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rows", type=int, default=22)
    args = parser.parse_args()
    device = torch.device("cpu")
    fns = step_functions(args.model, 100, device, setting=Setting(args.precision), methods=tuple(args.methods))
    for method, fn in fns.items():
        fn()
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"## {args.model} {method} ({args.precision})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
