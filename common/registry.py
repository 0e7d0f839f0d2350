"""Registries by name (models, data sets, update rules): one lookup whose error lists the valid names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """`registry[name]`, or a ValueError naming the unknown `kind` and every valid name."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}") from None
