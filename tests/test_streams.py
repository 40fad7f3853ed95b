"""The random streams keep the seed tuples every published number was drawn with."""

import torch

from asbnn import streams

CPU = torch.device("cpu")


def first_draw(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator).item()


def test_each_stream_is_its_historical_seed_tuple():
    seed, epoch, rank, k = 3, 5, 1, 4
    pairs = [
        (streams.epoch_batches(CPU, seed, epoch), (seed, epoch)),
        (streams.epoch_test_sample(CPU, seed, epoch), (seed, epoch, 1)),
        (streams.rank_noise(CPU, seed, epoch, rank), (seed, epoch, 2, rank)),
        (streams.eval_sample(CPU, seed, k), (seed, 7, k)),
    ]
    for generator, seeds in pairs:
        assert first_draw(generator) == first_draw(streams.make_generator(CPU, *seeds))
    assert len({first_draw(g) for g, _ in pairs}) == len(pairs)  # and they differ from each other


def test_make_generator_is_pinned():
    # the seed every run with seed 0 has drawn its first epoch from; a change here changes every result
    assert streams.make_generator(CPU, 0, 0).initial_seed() == 7896617691693857887
