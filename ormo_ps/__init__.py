"""OrMo-PS's public Python API: train your own model, on your own data, with your own loop, on an OrMo-PS
parameter server (asynchronous SGD with Ordered Momentum).

    from ormo_ps import RemoteOptimizer

    opt = RemoteOptimizer(model, server="127.0.0.1:50051")
    while not opt.done:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(loss=loss)

A thin layer over the project's packages (`worker`, `common`): what a user's code may rely on is here.
`Dataset` is the in-memory data set type a `--dataset my_pkg.data:load` callable may return (a (train, test)
pair of torch datasets serves as well); `recompute_batchnorm` sets a model's BatchNorm running statistics to
their average over given input batches, as the project's evaluations do at the parameters they evaluate.
"""

from __future__ import annotations

from common.data import Dataset
from common.evaluation import recompute_bn_stats as recompute_batchnorm
from worker.remote import RemoteOptimizer, ServerError

__version__ = "0.1.0"
__all__ = ["Dataset", "RemoteOptimizer", "ServerError", "__version__", "recompute_batchnorm"]
