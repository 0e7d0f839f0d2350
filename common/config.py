"""The run's configuration, shared by the simulator, the server and (through the server) the workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from server.algorithms import SCHEDULERS, get_algorithm

# The model trained when `--model` is not given, per dataset.
DEFAULT_MODELS = {"cifar10": "resnet20", "cifar100": "resnet20", "digits": "mlp", "synthetic": "mlp"}


@dataclass(frozen=True)
class RunConfig:
    """One training run. Validated on construction; `ValueError` names the field."""

    algo: str = "ormo"
    workers: int = 4
    scheduler: str | None = None  # None: the algorithm's own
    model: str | None = None  # None: DEFAULT_MODELS[dataset]
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 128
    lr: float = 0.1
    warmup_epochs: float = 0.0
    lr_milestones: tuple[float, ...] | None = None  # epochs; None: 50% and 75% of the run
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: float = 30.0
    iterations: int | None = None  # overrides epochs
    seed: int = 0
    vanilla_sgd_step: bool = False
    reject_nonfinite: bool = True

    def __post_init__(self) -> None:
        get_algorithm(self.algo)
        checks = [
            ("workers", self.workers >= 1, "must be >= 1"),
            ("scheduler", self.scheduler is None or self.scheduler in SCHEDULERS, f"must be one of {SCHEDULERS}"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "must be in (0, 1]"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("iterations", self.iterations is None or self.iterations >= 1, "must be >= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        if self.model is None and self.dataset not in DEFAULT_MODELS:
            raise ValueError(f"model must be given for dataset {self.dataset!r}")
        if self.vanilla_sgd_step and "vanilla_sgd_step" not in get_algorithm(self.algo).options:
            raise ValueError(f"vanilla_sgd_step is OrMo's ablation; it does not apply to algo {self.algo!r}")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.dataset]

    def total_iterations(self, iterations_per_epoch: int) -> int:
        return self.iterations if self.iterations is not None else max(1, round(self.epochs * iterations_per_epoch))

    def milestones(self, iterations_per_epoch: int) -> tuple[float, ...]:
        if self.lr_milestones is not None:
            return tuple(self.lr_milestones)
        run_epochs = self.total_iterations(iterations_per_epoch) / iterations_per_epoch
        return (0.5 * run_epochs, 0.75 * run_epochs)

    def worker_seed(self, worker: int) -> int:
        """The seed of worker `worker`'s mini-batch stream (independent per worker, fixed by the run seed)."""
        return (self.seed * 1_000_003 + 7919 * (worker + 1)) % (2**63)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model_name
        return d
