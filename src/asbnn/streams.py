"""Named random streams: every draw of a run comes from a generator seeded by a fixed tuple of ints.

The tuples are part of every published number (a resumed run replays them, an evaluation with the
same seed redraws the same sampled models), so their values never change. Each stream has one
constructor here, so two parts of the code cannot pick the same tuple by accident. One overlap is
inherited and kept for the numbers' sake: the test sample of 0-based epoch 7 of a run with seed s
draws what evaluation sample 1 with seed s draws (both `(s, 7, 1)`).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """The tag that tells the streams of one seed apart (a position in the seed tuple)."""

    EPOCH_TEST_SAMPLE = 1  # (seed, epoch, 1)
    RANK_NOISE = 2  # (seed, epoch, 2, rank)
    EVAL_SAMPLE = 7  # (seed, 7, k)


def make_generator(device: torch.device | str, *seeds: int) -> torch.Generator:
    """A generator seeded from several integers, reproducible on any machine."""
    seed = int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)


def epoch_batches(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation of 0-based `epoch` (alike on every rank), and a lone process's weight noise."""
    return make_generator(device, seed, epoch)


def epoch_test_sample(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """The one sampled model whose test accuracy is logged after 0-based `epoch`."""
    return make_generator(device, seed, epoch, Stream.EPOCH_TEST_SAMPLE)


def rank_noise(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The weight noise of process `rank` in 0-based `epoch` of a multi-process run."""
    return make_generator(device, seed, epoch, Stream.RANK_NOISE, rank)


def eval_sample(device: torch.device, seed: int, k: int) -> torch.Generator:
    """Sampled model `k` of an evaluation with `seed`; each is seeded alone, so chunking never changes it."""
    return make_generator(device, seed, Stream.EVAL_SAMPLE, k)
