"""The README's main job: train VI and VI + AS side by side on a small CPU scale and compare them.

Both runs share every setting but the method (the shipped `quickstart.yaml`: LeNet-5 on
Fashion-MNIST), and both are evaluated with 100 sampled models, MNIST serving as the
out-of-distribution set. Finished runs are kept, so a second call only redoes what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import make_config
from ..results import compare_runs, evaluate_run
from ..train import train

QUICKSTART_CONFIG = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def quickstart(out: Path, data_root: str | None = None, quiet: bool = False, **overrides: Any) -> str:
    """Train and evaluate VI and VI + AS into `out/vi` and `out/as`; return the comparison table."""
    runs = []
    for method in ("vi", "as"):
        values = {"method": method, **overrides}
        if data_root is not None:
            values["data_root"] = data_root
        cfg = make_config(QUICKSTART_CONFIG, values)
        run = out / method
        began = time.perf_counter()
        if not quiet:
            print(f"== {method}: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs -> {run}")
        train(cfg, run, resume=True, progress=not quiet)  # a killed quickstart goes on where it was
        evaluate_run(run, num_samples=cfg.eval_samples, ood=["mnist"], progress=False)
        if not quiet:
            print(f"   done in {time.perf_counter() - began:.0f} s")
        runs.append(run)
    return compare_runs(runs, out=out)
