"""A small all-convolutional network with BatchNorm after every convolution.

conv 16-32-64 (3x3, each followed by BatchNorm and ReLU, max-pool after the first two), global
average pooling and one linear layer: 23 k parameters. It is the cpu-scale stand-in for the
paper's ResNets and VGG-16-BN, whose every convolution also feeds a BatchNorm, and it has no
wide fully connected layer (LeNet-5's fc1 with 400 inputs is where a sign step on all weights
at once does the most damage). It trains on 28x28 or 32x32 inputs alike.
"""

import torch
import torch.nn.functional as F
from torch import nn

from asbnn.models.registry import register_model


class AllConv(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        chans = (in_channels, *widths)
        # convs feed BN, whose shift makes a conv bias redundant
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False) for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i < 2:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


@register_model("allconv")
def allconv(num_classes: int = 10, in_channels: int = 1) -> AllConv:
    """Defaults to one (grayscale) channel; ``create_model`` passes its own ``in_channels``."""
    return AllConv(num_classes, in_channels)
