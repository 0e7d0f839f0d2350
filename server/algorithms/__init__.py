"""Update rules, one module each, chosen by name from the registry `ALGORITHMS`."""

from server.algorithms import asgdm, ormo, sgd, shifted_momentum, smega2  # noqa: F401  (registration)
from server.algorithms.base import ALGORITHMS, SCHEDULERS, AlgorithmSpec, UpdateRule, get_algorithm

__all__ = ["ALGORITHMS", "SCHEDULERS", "AlgorithmSpec", "UpdateRule", "get_algorithm"]
