"""LeNet-5 with batch norm for MNIST-like 28x28 inputs; the second pool is adaptive
so 32x32 inputs (e.g. padded MNIST or CIFAR) reach the same 16x5x5 feature map."""

import torch
import torch.nn.functional as F
from torch import nn

from asbnn.models.registry import register_model


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        # convs feed BN, whose shift makes a conv bias redundant
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool2 = nn.AdaptiveMaxPool2d(5)  # == MaxPool2d(2) on the 10x10 map of a 28x28 input
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Defaults to one (grayscale) channel; ``create_model`` passes its own ``in_channels``."""
    return LeNet5(num_classes, in_channels)
