"""Models larger than the server's receive limit for a client-brought model (a chunk + 1 MiB), for
tests/test_byom.py: `--model client` must start, train and evaluate them (issue #21)."""

from __future__ import annotations

import math

from torch import nn

WIDE_PARAMETERS = 11_000_000


def wide(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """An MLP with one hidden layer wide enough for about 11M parameters (44 MB of float32)."""
    inputs = math.prod(input_shape)
    hidden = WIDE_PARAMETERS // (inputs + 1 + num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
