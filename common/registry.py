"""Registries by name (models, data sets, update rules): one lookup whose error lists the valid names, and
objects named by import path (`my_pkg.models:build`) beside the names where a user may bring their own."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

IMPORT_PATH = "MODULE:ATTRIBUTE"


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """`registry[name]`, or a ValueError naming the unknown `kind` and every valid name."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}") from None


def is_import_path(spec: str) -> bool:
    """A `package.module:attribute` spelling (names in the registries have no colon)."""
    return ":" in spec


def import_object(spec: str, kind: str) -> Callable[..., Any]:
    """The callable `spec` = "package.module:attribute" names (the attribute may be dotted), imported from the
    installed packages, PYTHONPATH or the current directory; a ValueError saying what is wrong otherwise:
    a malformed path, a module not found or failing to import, an attribute missing, not a callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(f"{kind} {spec!r}: an import path is {IMPORT_PATH}, e.g. my_pkg.models:build")
    # Console scripts (ps-server, ...) do not put the current directory on sys.path as `python -m` does;
    # appended, it never shadows an installed package.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"{kind} {spec!r}: no module named {e.name!r} (not installed, not on PYTHONPATH and "
                             "not in the current directory)") from None
        raise ValueError(f"{kind} {spec!r}: importing {module_name} failed: {e}") from None
    except Exception as e:  # the user's module raised while being imported
        raise ValueError(f"{kind} {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{kind} {spec!r}: module {module_name} has no attribute {attribute!r}") from None
    if not callable(obj):
        raise ValueError(f"{kind} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def resolve(registry: Mapping[str, T], spec: str, kind: str) -> T | Callable[..., Any]:
    """A registered name's entry, or the callable an import path names; a ValueError listing both otherwise."""
    if spec in registry:
        return registry[spec]
    if is_import_path(spec):
        return import_object(spec, kind)
    raise ValueError(f"unknown {kind} {spec!r}; valid names: {', '.join(sorted(registry))}, or an import path "
                     f"{IMPORT_PATH}")


def call_imported(factory: Callable[..., T], spec: str, kind: str, args: tuple[Any, ...], takes: str) -> T:
    """`factory(*args)`, or `factory()` where its signature takes no arguments; a ValueError naming what it
    must take otherwise. (What a user's callable raises while it runs is theirs and passes through.)"""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: try the full call
        return factory(*args)
    for candidate in (args, ()):
        try:
            signature.bind(*candidate)
        except TypeError:
            continue
        return factory(*candidate)
    raise ValueError(f"{kind} {spec!r} must take {takes}, or nothing; its signature is {signature}")
