"""Evaluating a flat parameter vector: BatchNorm statistics recomputed at it, then test accuracy and loss.

The server keeps only trainable parameters. BatchNorm running statistics are not gradients, so the
evaluator recomputes them at the parameters it evaluates (on `bn_batches` train mini-batches without
augmentation) before measuring test accuracy; see common/models.py.
"""

from __future__ import annotations

import torch

from common.data import Dataset, bn_calibration_batches, evaluate
from common.models import FlatModel, recompute_bn_stats


class Evaluator:
    def __init__(
        self,
        flat_model: FlatModel,
        dataset: Dataset,
        *,
        bn_batches: int = 20,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.model = flat_model
        self.dataset = dataset
        device = flat_model.device
        # Fixed calibration batches: evaluations at the same parameters give the same numbers.
        self.calibration = bn_calibration_batches(dataset, bn_batches, min(batch_size, dataset.num_train), seed, device)
        self.batch_size = 1000

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> dict[str, float]:
        self.model.load_(params.to(self.model.device))
        recompute_bn_stats(self.model.module, self.calibration)
        return evaluate(self.model.module, self.dataset, self.model.device, self.batch_size)
