"""The run's configuration: what the server computes and on what, shared by the service, the simulator and
(through the server's Welcome) the workers.

Each field is declared once, with its help and its rule (`ormo_ps.common.settings.setting`): the validation, the
options of ps-server, ps-sim and ps-launch, the `PS_*` variables of the container files, resuming from a
checkpoint and the flags ps-launch hands to its server all derive from this class. A new option is a new
field here and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ormo_ps.common import settings
from ormo_ps.common.data import DATASETS, Dataset, resolve_dataset
from ormo_ps.common.models import FROM_CLIENT, MODELS, FlatModel, build_model, resolve_model
from ormo_ps.common.settings import setting
from ormo_ps.server.algorithms import ALGORITHMS, SCHEDULERS, get_algorithm
from ormo_ps.server.schedule import LRSchedule

# The model trained when `--model` is not given, per dataset.
DEFAULT_MODELS = {"cifar10": "resnet20", "cifar100": "resnet20", "digits": "mlp", "synthetic": "mlp"}


def _model_spec(text: str) -> str:
    """`--model`'s text, checked: a registered name, an import path that imports, or `client`."""
    if text != FROM_CLIENT:
        resolve_model(text)
    return text


def _dataset_spec(text: str) -> str:
    """`--dataset`'s text, checked: a registered name or an import path that imports."""
    resolve_dataset(text)
    return text


@dataclass(frozen=True)
class RunConfig:
    """One training run. Validated on construction; `ValueError` names the field."""

    algo: str = setting("ormo", "Server update rule.", choices=lambda: ALGORITHMS)
    workers: int = setting(4, "Number of workers K.", min=1, short="-k")
    scheduler: str | None = setting(
        None, "Override the algorithm's scheduler (async: answer each gradient; sync: wait for all K).",
        choices=lambda: SCHEDULERS)
    model: str | None = setting(
        None, f"Model: {', '.join(sorted(MODELS))}; or an import path MODULE:CALLABLE (called with the number of "
              "classes and the input shape, or nothing, it returns a torch.nn.Module); or client (the first client "
              "brings its own). Default: resnet20 for CIFAR, mlp for digits and synthetic.",
        parse=_model_spec, metavar="NAME|MODULE:CALLABLE")
    dataset: str = setting(
        "digits", f"Data set: {', '.join(sorted(DATASETS))} (digits and synthetic need no download); or an import "
                  "path MODULE:CALLABLE (called with --data-dir, or nothing, it returns a (train, test) pair of "
                  "torch datasets or an ormo_ps.Dataset).", parse=_dataset_spec, metavar="NAME|MODULE:CALLABLE")
    data_dir: str | None = setting(
        None, "CIFAR directory: the original python batches or train/<class>/*, test/<class>/* images.",
        metavar="DIRECTORY")
    download: bool = setting(False, "Download CIFAR into --data-dir if it is not there (needs the network).",
                             negatable=True)
    batch_size: int = setting(128, "Per-worker mini-batch size B; an epoch is N_train / B server iterations.",
                              min=1, short="-b")
    lr: float = setting(0.1, "Learning rate eta.", min=0, min_open=True)
    warmup_epochs: float = setting(0.0, "Linear learning-rate warm-up, in epochs.", min=0)
    lr_milestones: tuple[float, ...] | None = setting(
        None, "Epochs at which eta is multiplied by --lr-gamma (default: 50% and 75% of the run).",
        parse=settings.floats, metavar="EPOCHS")
    lr_gamma: float = setting(0.1, "Step-decay factor.", min=0, max=1, min_open=True)
    momentum: float = setting(0.9, "Momentum beta.", min=0, max=1, max_open=True)
    weight_decay: float = setting(1e-4, "Weight decay, added by the worker to its gradient.", min=0)
    epochs: float = setting(30.0, "Length of the run in epochs.", min=0, min_open=True)
    iterations: int | None = setting(None, "Length of the run in server iterations (overrides --epochs).", min=1)
    seed: int = setting(0, "Seed of w_0, data order and timing.")
    vanilla_sgd_step: bool = setting(False, "OrMo's ablation: w -= eta*g in place of line 13.")
    dn_buffer: int | None = setting(
        None, "Delayed Nesterov (--algo dn): its buffer size N, the arrivals whose mean enters the momentum at "
              "once (default: K).", min=1)
    dn_activation: float = setting(
        0.0, "Delayed Nesterov (--algo dn): its momentum activation c, the momentum's share applied at every "
             "arrival (0: only at each N-th).", min=0)
    ringmaster_r: int | None = setting(
        None, "Ringmaster ASGD (--algo ringmaster): discard gradients this many iterations stale or more "
              "(default: K).", min=1)
    allow_nonfinite: bool = setting(False, "Apply NaN/Inf gradients instead of rejecting them.")
    wire_dtype: str = setting(
        "float32", "What gradients and the parameters sent to workers travel as: bfloat16 and float16 halve the "
                   "bytes (the server keeps float32 parameters and applies in float32; float16 overflows above "
                   "65504). bench/results/wire_dtype.md measures speed and accuracy.",
        choices=lambda: ("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        settings.validate(self)
        if self.model is not None:
            _model_spec(self.model)
        _dataset_spec(self.dataset)
        if self.lr_milestones is not None and (list(self.lr_milestones) != sorted(self.lr_milestones)
                                               or any(m <= 0 for m in self.lr_milestones)):
            raise ValueError(f"lr_milestones must be increasing positive epochs, got {self.lr_milestones}")
        if self.model is None and self.dataset not in DEFAULT_MODELS:
            raise ValueError(f"model must be given for dataset {self.dataset!r} (a name, an import path or "
                             f"{FROM_CLIENT})")
        if self.vanilla_sgd_step and "vanilla_sgd_step" not in get_algorithm(self.algo).options:
            raise ValueError(f"vanilla_sgd_step is OrMo's ablation; it does not apply to algo {self.algo!r}")
        for name, unset, owner in (("dn_buffer", None, "dn"), ("dn_activation", 0.0, "dn"),
                                   ("ringmaster_r", None, "ringmaster")):
            if getattr(self, name) != unset and name not in get_algorithm(self.algo).options:
                raise ValueError(f"{name} is an option of algo {owner!r}; it does not apply to algo {self.algo!r}")

    # ----- what the run's settings mean ------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.dataset]

    @property
    def model_from_client(self) -> bool:
        """The run names no model (`--model client`): the first client that registers brings its own."""
        return self.model == FROM_CLIENT

    @property
    def wire_torch_dtype(self) -> torch.dtype:
        """The torch dtype of `wire_dtype`."""
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.wire_dtype]

    @property
    def effective_scheduler(self) -> str:
        return self.scheduler or get_algorithm(self.algo).default_scheduler

    def total_iterations(self, iterations_per_epoch: int) -> int:
        return self.iterations if self.iterations is not None else max(1, round(self.epochs * iterations_per_epoch))

    def milestones(self, iterations_per_epoch: int) -> tuple[float, ...]:
        if self.lr_milestones is not None:
            return tuple(self.lr_milestones)
        run_epochs = self.total_iterations(iterations_per_epoch) / iterations_per_epoch
        return (0.5 * run_epochs, 0.75 * run_epochs)

    def lr_schedule(self, iterations_per_epoch: int) -> LRSchedule:
        return LRSchedule(base_lr=self.lr, iterations_per_epoch=iterations_per_epoch,
                          warmup_epochs=self.warmup_epochs, milestones=self.milestones(iterations_per_epoch),
                          gamma=self.lr_gamma)

    def initial_model(self, dataset: Dataset, device: torch.device | str = "cpu") -> FlatModel:
        """The model with `w_0` drawn from the run's seed (the same in the simulator and the service)."""
        if self.model_from_client:
            raise ValueError(f"the run names no model (--model {FROM_CLIENT}: its clients bring their own); the "
                             "simulator and ps-launch need a model name or an import path")
        torch.manual_seed(self.seed)
        return FlatModel(build_model(self.model_name, dataset.num_classes, dataset.input_shape), device=device)

    def worker_seed(self, worker: int) -> int:
        """The seed of worker `worker`'s mini-batch stream (independent per worker, fixed by the run seed)."""
        return (self.seed * 1_000_003 + 7919 * (worker + 1)) % (2**63)

    # ----- saving and reproducing ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every setting, the model resolved (what `from_dict` reads back: the same run)."""
        return settings.to_dict(self) | {"model": self.model_name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A run from `to_dict`'s output, also as saved by earlier versions (checkpoints, metrics)."""
        return settings.from_dict(cls, data, renamed={"reject_nonfinite": lambda v: ("allow_nonfinite", not v)})

    def to_flags(self) -> list[str]:
        """The command-line flags that reproduce this run (what ps-launch hands its ps-server)."""
        return settings.to_flags(self)
