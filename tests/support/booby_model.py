"""A surrogate that raises on a sentinel input: shipped in a test archive to make the defense fail for real
inside a TorchServe worker (MAD runs the surrogate on every query). Imports only torch (loaded from the
archive as an eager model file)."""

import torch
from torch import nn

SENTINEL = 123.0


class BoobyMLP(nn.Module):
    input_shape = (64,)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == SENTINEL).any()):
            raise RuntimeError("booby trap: sentinel input reached the surrogate")
        return self.head(self.body(x))
