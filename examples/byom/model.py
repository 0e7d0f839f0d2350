"""The example's model: a small CNN with BatchNorm for 8x8 digit images (not one of OrMo-PS's models).

`--model examples.byom.model:build` names it for ps-server, ps-sim, ps-launch, ps-worker and ps-eval.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsNet(nn.Module):
    """Two 3x3 conv-BatchNorm-ReLU layers (16 channels, then 32 at stride 2) and a linear classifier."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * ((height + 1) // 2) * ((width + 1) // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """What `--model examples.byom.model:build` calls: the number of classes and the (C, H, W) input shape."""
    return DigitsNet(num_classes, input_shape)
