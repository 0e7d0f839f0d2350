"""Update rules, one module each, chosen by name from the registry `ALGORITHMS`. Every module of this package
is imported here, which registers its rules: a new rule is its own module (and its test), nothing else."""

import importlib
import pkgutil

from ormo_ps.server.algorithms.base import ALGORITHMS, SCHEDULERS, AlgorithmSpec, UpdateRule, get_algorithm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALGORITHMS", "SCHEDULERS", "AlgorithmSpec", "UpdateRule", "get_algorithm"]
