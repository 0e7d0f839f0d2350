"""Update rules, one module each, chosen by name from the registry `ALGORITHMS`."""

from ormo_ps.server.algorithms import (asgdm, delayed_nesterov, ormo, ringmaster, sgd,  # noqa: F401  (registration)
                               shifted_momentum, smega2)
from ormo_ps.server.algorithms.base import ALGORITHMS, SCHEDULERS, AlgorithmSpec, UpdateRule, get_algorithm

__all__ = ["ALGORITHMS", "SCHEDULERS", "AlgorithmSpec", "UpdateRule", "get_algorithm"]
