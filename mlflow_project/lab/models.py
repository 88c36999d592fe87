"""Victim architectures: the paper's LeNet-like net for 28x28 images and a small MLP for 8x8 digits.

This file is also shipped inside .mar archives as the eager runtime's model file, so it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """The paper's LeNet-like net: conv 20, conv 50, fc 800 -> 500 -> K, for 1 x 28 x 28 inputs."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class MLP(nn.Module):
    """A small MLP for flattened 8 x 8 digits (64 inputs): 64 -> hidden -> hidden -> K."""

    input_shape = (64,)

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCHITECTURES = {"lenet": LeNet, "mlp": MLP}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised victim architecture by name (lenet, mlp)."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"arch: unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}") from None
    return cls(num_classes=num_classes)
