"""OrMo-PS's public Python API: train your own model, on your own data, with your own loop, on an OrMo-PS
parameter server (asynchronous SGD with Ordered Momentum).

    from ormo_ps import RemoteOptimizer

    opt = RemoteOptimizer(model, server="127.0.0.1:50051")
    while not opt.done:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(loss=loss)

A thin layer over the project's packages (`ormo_ps.worker`, `ormo_ps.common`): what a user's code may rely on
is here. The project's parts are subpackages of this one name (`ormo_ps.server`, `ormo_ps.sim`, ...): installed,
they live inside it; in a source checkout they are the repository's top-level folders (see below).
`Dataset` is the in-memory data set type a `--dataset my_pkg.data:load` callable may return (a (train, test)
pair of torch datasets serves as well); `recompute_batchnorm` sets a model's BatchNorm running statistics to
their average over given input batches, as the project's evaluations do at the parameters they evaluate.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# In a source checkout that is not installed (`PYTHONPATH=.`, a copy of the tree on another machine), the
# subpackages are the repository's top-level folders beside this one: look for them there too. Installed
# (pip install ., setup.cfg's package_dir), they are inside this folder and this adds nothing; an editable
# install maps them with its own finder.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "server").is_dir() and (_HERE.parent / "server" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 (the package's own __path__)

__version__ = "0.1.0"
__all__ = ["Dataset", "RemoteOptimizer", "ServerError", "__version__", "recompute_batchnorm"]

# The public names, imported when first used: `import ormo_ps.common.transport` (a benchmark's pusher, which
# imports no torch) must not pull in the client and torch.
_PUBLIC = {"Dataset": ("ormo_ps.common.data", "Dataset"),
           "recompute_batchnorm": ("ormo_ps.common.evaluation", "recompute_bn_stats"),
           "RemoteOptimizer": ("ormo_ps.worker.remote", "RemoteOptimizer"),
           "ServerError": ("ormo_ps.worker.remote", "ServerError")}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ormo_ps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
