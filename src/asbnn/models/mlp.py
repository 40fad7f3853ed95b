"""A plain multilayer perceptron without BatchNorm: a baseline, and the model whose data-parallel
training can be compared exactly with a single process (BatchNorm's per-rank statistics differ).
Images are average-pooled to 14 x 14 first, so it takes 28 x 28 and 32 x 32 inputs alike."""

from torch import nn

from asbnn.models.registry import register_model


@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(14), nn.Flatten(), nn.Linear(in_channels * 14 * 14, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )
