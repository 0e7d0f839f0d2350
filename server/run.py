"""Building a run: the initial model `w_0` from the seed, and the ServerCore from the run's config.

Shared by the simulator and the gRPC service, so the same seed gives the same `w_0` and core in both.
"""

from __future__ import annotations

import torch

from common.config import RunConfig
from common.data import Dataset
from common.models import FlatModel, build_model
from server.core import CoreConfig, ServerCore
from server.schedule import LRSchedule


def make_core(run: RunConfig, params0: torch.Tensor, iters_per_epoch: int) -> ServerCore:
    """The ServerCore of a run (shared by the simulator and the gRPC service)."""
    schedule = LRSchedule(
        base_lr=run.lr,
        iterations_per_epoch=iters_per_epoch,
        warmup_epochs=run.warmup_epochs,
        milestones=run.milestones(iters_per_epoch),
        gamma=run.lr_gamma,
    )
    config = CoreConfig(
        algo=run.algo,
        num_workers=run.workers,
        lr_schedule=schedule,
        momentum=run.momentum,
        scheduler=run.scheduler,
        total_iterations=run.total_iterations(iters_per_epoch),
        vanilla_sgd_step=run.vanilla_sgd_step,
        reject_nonfinite=run.reject_nonfinite,
    )
    return ServerCore(params0, config)


def initial_model(run: RunConfig, dataset: Dataset, device: torch.device) -> FlatModel:
    """The model with `w_0` drawn from the run's seed (the same in the simulator and the service)."""
    torch.manual_seed(run.seed)
    return FlatModel(build_model(run.model_name, dataset.num_classes, dataset.input_shape), device=device)
