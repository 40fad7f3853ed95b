"""The README's main job: train VI and VI + AS side by side on a small CPU scale and compare them.

Both runs share every setting but the method (the shipped `quickstart.yaml`: LeNet-5 on
Fashion-MNIST), and both are evaluated with 100 sampled models, MNIST serving as the
out-of-distribution set. Finished runs are kept, so a second call only redoes what is missing.
The last line says what AS traded against VI here: the regime map (docs/results/map) found no
setting at this scale where AS lifts the worst sampled model once BatchNorm statistics are
recalibrated per sample, so the quickstart shows the trade rather than a setting picked for AS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..config import make_config
from ..results import compare_runs, evaluate_run
from ..fileio import read_jsonl
from ..runfolder import LOG
from ..train import train
from .map_report import passes_per_step

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
    text = compare_runs(runs, out=out)
    line = trade_summary(*(json.loads((run / "eval" / "eval.json").read_text()) for run in runs),
                         *(sum(r["epoch_time"] for r in read_jsonl(run / LOG)) for run in runs))
    print(line)
    return text + "\n" + line + "\n"


def trade_summary(vi: dict[str, Any], adv: dict[str, Any], vi_seconds: float, adv_seconds: float) -> str:
    """One line: what AS gained or lost against VI on each headline number, and what it cost."""
    def points(section: str, key: str) -> float:
        return 100 * (adv[section][key] - vi[section][key])

    return (f"AS - VI: lowest sampled model {points('sampled', 'lowest'):+.2f} points, spread (std of the "
            f"sampled accuracies) {points('sampled', 'std'):+.2f}, ensemble {points('ensemble', 'accuracy'):+.2f}, "
            f"ensemble NLL {adv['ensemble']['nll'] - vi['ensemble']['nll']:+.3f} nats, for "
            f"{passes_per_step(adv['config']) / passes_per_step(vi['config']):.0f}x the forward-backward passes "
            f"({adv_seconds:.0f} s against {vi_seconds:.0f} s of training here; one seed, see docs/results/map)")

