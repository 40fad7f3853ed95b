"""Accuracy, NLL and ECE under distribution shift: the test set corrupted on the fly, per
corruption and severity (`data.corruptions`, deterministic from a seed).

A full sweep is 8 corruptions x 5 severities = 40 passes over the test set, so it runs on a fixed
subset of the test images with fewer sampled networks than the main evaluation; the clean subset
is evaluated with the same networks as the reference of severity 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import metrics
from .build import subset
from .data import ArrayDataset, DatasetInfo, DeviceLoader, eval_loader
from .data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .evaluate import Predictions

#: predict(loader) -> the Predictions of the networks under evaluation on that loader
Predict = Callable[[DeviceLoader], Predictions]


def shift_numbers(pred: Predictions) -> dict[str, float]:
    """The ensemble's accuracy, NLL and ECE (15 equal-width bins) on one shifted set."""
    probs, labels = pred.ensemble_probs, pred.labels
    return {"accuracy": float(metrics.accuracy(probs, labels)), "nll": float(metrics.nll(probs, labels)),
            "ece": float(metrics.ece(probs, labels))}


def evaluate_shift(predict: Predict, test: ArrayDataset, info: DatasetInfo, *, size: int, seed: int,
                   device: Any = "cpu", channels_last: bool = False,
                   ) -> tuple[dict[str, Any], dict[str, Predictions]]:
    """Every corruption at every severity of a fixed `size`-image subset of `test`.

    Returns the numbers (for eval.json) and the Predictions by set name ("clean",
    "<corruption>-<severity>"), whose per-sample probabilities `--save-probs` keeps.
    """
    data = subset(test, size)
    preds = {"clean": predict(eval_loader(data, info.mean, info.std, device=device, channels_last=channels_last))}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            shifted = ArrayDataset(corrupt(data.images, name, severity, seed), data.labels, data.classes)
            loader = eval_loader(shifted, info.mean, info.std, device=device, channels_last=channels_last)
            preds[f"{name}-{severity}"] = predict(loader)
    numbers = {key: shift_numbers(pred) for key, pred in preds.items()}
    by_corruption = {name: {str(s): numbers[f"{name}-{s}"] for s in SEVERITIES} for name in CORRUPTIONS}
    mean_by_severity = {str(s): {m: float(np.mean([by_corruption[c][str(s)][m] for c in CORRUPTIONS]))
                                 for m in ("accuracy", "nll", "ece")} for s in SEVERITIES}
    result = {"num_inputs": len(data.labels), "num_samples": len(preds["clean"].sample_correct), "seed": seed,
              "clean": numbers["clean"], "corruptions": by_corruption, "mean_by_severity": mean_by_severity}
    return result, preds
