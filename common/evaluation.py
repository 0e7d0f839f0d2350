"""Evaluating a flat parameter vector: BatchNorm statistics recomputed at it, then accuracy and loss.

The server keeps only trainable parameters (see common/models.py). BatchNorm running statistics are not
gradients, so whoever evaluates a parameter vector (the simulator, ps-eval) first loads it and recomputes
the running statistics at exactly that vector (`recompute_bn_stats`, over fixed unaugmented training
batches), so the reported accuracy belongs to the evaluated parameters and not to statistics accumulated
by some worker along a different trajectory. Then it measures accuracy and mean cross-entropy on the test
split and, when one was held out, on the validation split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ormo_ps.common.data import Dataset
from ormo_ps.common.models import FlatModel

logger = logging.getLogger(__name__)


def eval_batches(
    dataset: Dataset, split: str = "test", batch_size: int = 1000, device: torch.device | str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised, unaugmented (x, y) batches of a split in order; the last batch may be smaller."""
    if split not in dataset.splits:
        raise ValueError(f"split must be one of {', '.join(dataset.splits)}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    xs: torch.Tensor = getattr(dataset, f"{split}_x")
    ys: torch.Tensor = getattr(dataset, f"{split}_y")
    for start in range(0, len(xs), batch_size):
        x = xs[start : start + batch_size].to(device)
        yield dataset.normalize(x), ys[start : start + batch_size].to(device)


def bn_calibration_batches(
    dataset: Dataset, n_batches: int, batch_size: int, seed: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """`n_batches` normalised, unaugmented train-set input batches drawn without replacement (per pass) by `seed`."""
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    needed = n_batches * batch_size
    passes = math.ceil(needed / dataset.num_train)
    order = torch.cat([torch.randperm(dataset.num_train, generator=generator) for _ in range(passes)])[:needed]
    return [
        dataset.normalize(dataset.train_x[order[i * batch_size : (i + 1) * batch_size]].to(device))
        for i in range(n_batches)
    ]


def _batch_norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_bn_stats(module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm layer's running statistics by their exact average over `batches`.

    Momentum is set to None (cumulative moving average) while the batches run, so each batch weighs the
    same and nothing of the old statistics survives; momentum and train/eval modes are restored after.
    """
    layers = _batch_norm_layers(module)
    if not layers:
        return
    saved_modes = [(m, m.training) for m in module.modules()]
    saved_momenta = [m.momentum for m in layers]
    saved_stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    n_batches = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for x in batches:
            module(x)
            n_batches += 1
    finally:
        for m, momentum in zip(layers, saved_momenta):
            m.momentum = momentum
        for m, training in saved_modes:
            m.training = training
        if n_batches == 0:
            # Reset-but-never-updated statistics would be mean 0 / var 1: restore the old ones instead.
            for m, (mean, var, tracked) in zip(layers, saved_stats):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
    if n_batches == 0:
        raise ValueError("batches is empty: at least one batch is needed to recompute BatchNorm statistics")
    logger.debug("recomputed BatchNorm statistics of %d layers over %d batches", len(layers), n_batches)


@torch.no_grad()
def evaluate(
    module: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 1000
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `module` in eval mode on each of `dataset.eval_splits`
    (`test_accuracy`, `test_loss`, and `val_accuracy`, `val_loss` when there is a validation split); the
    module's train/eval mode is restored after."""
    was_training = module.training
    module.eval()
    result: dict[str, float] = {}
    try:
        for split in dataset.eval_splits:
            correct, loss_sum, n = 0, 0.0, 0
            for x, y in eval_batches(dataset, split, batch_size, device):
                logits = module(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                n += len(y)
            if n == 0:
                raise ValueError(f"dataset {dataset.name!r} has an empty {split} set")
            result[f"{split}_accuracy"], result[f"{split}_loss"] = correct / n, loss_sum / n
    finally:
        module.train(was_training)
    return result


class Evaluator:
    """Evaluates parameter vectors of one model on one data set: `evaluator(params)` loads them, recomputes
    BatchNorm statistics on `bn_batches` fixed calibration batches of `calibration_batch_size` training
    samples (so evaluations at the same parameters give the same numbers) and evaluates in batches of
    `eval_batch_size`."""

    def __init__(
        self,
        flat_model: FlatModel,
        dataset: Dataset,
        *,
        bn_batches: int = 20,
        calibration_batch_size: int = 256,
        eval_batch_size: int = 1000,
        seed: int = 0,
    ) -> None:
        self.model = flat_model
        self.dataset = dataset
        self.eval_batch_size = eval_batch_size
        self.calibration = bn_calibration_batches(dataset, bn_batches, min(calibration_batch_size, dataset.num_train),
                                                  seed, flat_model.device)

    def load(self, params: torch.Tensor) -> nn.Module:
        """The model at `params`, its BatchNorm statistics recomputed there (what is evaluated and saved)."""
        self.model.load_(params.to(self.model.device))
        recompute_bn_stats(self.model.module, self.calibration)
        return self.model.module

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> dict[str, float]:
        return evaluate(self.load(params), self.dataset, self.model.device, self.eval_batch_size)
