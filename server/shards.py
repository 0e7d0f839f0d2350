"""Sharded arithmetic: the flat parameter cut into S contiguous slices, each slice a `ServerCore` of its own,
every push applied to all of them in one order, so that the slices put together equal one server's parameter
bit for bit, after every push (issue #23's ground; the shard processes and their coordinator build on it).

Why this is exact. Every update rule is elementwise in the vectors (w, OrMo's u, SMEGA2's v and G, DN's m and
D) with scalars (t, the group I, eta_t, tau, SMEGA2's s) that depend only on the order of pushes, which every
shard sees the same. A shard's core therefore keeps the same scheduling state as one server's would (iteration,
waiting set, per-worker indexes: the same decisions, made S times) and applies the same scalar operations to
its elements. Elementwise kernels round each element the same way wherever it sits, provided it falls in the
same place of their vector loops: the cuts are at multiples of `ALIGN` elements (4 KiB of float32), a multiple
of every SIMD width, so each slice's loops line up with the whole vector's. (One server running several
intra-op threads cuts its vectors where its threads split them; a comparison is made with one thread each.)

What must be decided for the whole push before any slice changes (`ShardedCore.push`):

- validity: the gradient's size, dtype and finiteness, and the worker's index, are checked on every slice
  first (`ServerCore.validate` changes nothing); one bad slice rejects the push everywhere;
- overflow: a core proves from a bound it keeps that an update cannot make its state non-finite. When every
  slice proves it, the push is applied; when one cannot, every slice's state is saved first and restored if
  any slice's update is refused, so a push is applied on every slice or on none.
"""

from __future__ import annotations

from typing import Any

import torch

from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import Dispatch, PushRejected, ServerCore

ALIGN = 1024  # elements: every cut between two slices is a multiple of this


def shard_bounds(numel: int, shards: int, align: int = ALIGN) -> list[tuple[int, int]]:
    """[start, end) of each of `shards` contiguous slices of a vector of `numel` elements: as equal as cuts at
    multiples of `align` allow (one dtype: balanced by bytes). ValueError when some slice would be empty."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    blocks = -(-numel // align)
    if shards > blocks:
        raise ValueError(f"{shards} shards need at least {shards} blocks of {align} parameters "
                         f"({(shards - 1) * align + 1} parameters); the model has {numel}")
    cuts = [min(numel, round(blocks * i / shards) * align) for i in range(shards + 1)]
    cuts[-1] = numel
    return list(zip(cuts[:-1], cuts[1:]))


class ShardedCore:
    """S `ServerCore`s over the slices of `params0`, driven as one: the interface of `ServerCore` that the
    drivers use (start, push, deactivate, rejoin, state), with whole-vector parameters in its answers."""

    def __init__(self, params0: torch.Tensor, run: RunConfig, iterations_per_epoch: int = 1, shards: int = 2,
                 align: int = ALIGN) -> None:
        if params0.dim() != 1 or not params0.is_floating_point():
            raise ValueError(f"params0 must be a flat floating-point vector, got shape {tuple(params0.shape)} "
                             f"dtype {params0.dtype}")
        self.run = run
        self.numel = params0.numel()
        self.dtype = params0.dtype
        self.bounds = shard_bounds(self.numel, shards, align)
        self.cores = [ServerCore(params0[a:b], run, iterations_per_epoch) for a, b in self.bounds]
        self._sent = torch.empty_like(params0)  # the parameters a Dispatch carries, put together

    # ----- the state every core shares (the same in each: the first answers) ------------------------
    @property
    def lead(self) -> ServerCore:
        return self.cores[0]

    @property
    def iteration(self) -> int:
        return self.lead.iteration

    @property
    def epoch(self) -> float:
        return self.lead.epoch

    @property
    def total_iterations(self) -> int:
        return self.lead.total_iterations

    @property
    def done(self) -> bool:
        return self.lead.done

    @property
    def started(self) -> bool:
        return self.lead.started

    @property
    def num_workers(self) -> int:
        return self.lead.num_workers

    @property
    def workers(self):
        return self.lead.workers

    @property
    def staleness(self):
        return self.lead.staleness

    @property
    def discarded(self) -> int:
        return self.lead.discarded

    def lr(self) -> float:
        return self.lead.lr()

    def summary(self) -> dict[str, Any]:
        return self.lead.summary()

    # ----- parameters -------------------------------------------------------------------------------
    def current_params(self) -> torch.Tensor:
        """`w_t`, put together from the slices (a new tensor)."""
        return torch.cat([core.current_params() for core in self.cores])

    def _joined(self, answers: list[list[Dispatch]]) -> list[Dispatch]:
        """The shards' dispatches (the same receivers and index in each, slices of the parameters) as whole ones."""
        joined = []
        for parts in zip(*answers, strict=True):  # (strict: the shards disagree on the number of dispatches)
            first = parts[0]
            if any(p.workers != first.workers or p.iteration_index != first.iteration_index for p in parts):
                raise AssertionError(f"shards disagree on a dispatch: {[(p.workers, p.iteration_index) for p in parts]}")
            for (a, b), p in zip(self.bounds, parts):
                self._sent[a:b].copy_(p.params)
            joined.append(Dispatch(first.workers, self._sent, first.iteration_index))
        return joined

    # ----- driving ----------------------------------------------------------------------------------
    def start(self) -> Dispatch:
        return self._joined([[core.start()] for core in self.cores])[0]

    def push(self, worker: int, grad: torch.Tensor, iteration_index: int) -> list[Dispatch]:
        """One server iteration on every slice, or `PushRejected` and no slice changed."""
        if not isinstance(grad, torch.Tensor) or grad.dim() != 1 or grad.numel() != self.numel:
            shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise PushRejected("INVALID_ARGUMENT", f"gradient has shape {shape}; expected a flat vector of "
                               f"{self.numel} elements")
        slices = [grad[a:b] for a, b in self.bounds]
        # Phase 1: every slice valid (nothing changes), and each slice's largest magnitude.
        g_max = [core.validate(worker, g, iteration_index) for core, g in zip(self.cores, slices)]
        discarding = self.lead.scheduler == "async" and self.lead.rule.discards(iteration_index, self.iteration)
        saved = None
        if not discarding:
            lr = self.lead.update_rate(iteration_index)
            if not all(core.proves_finite(lr, m) for core, m in zip(self.cores, g_max)):
                saved = [core.state_dict() for core in self.cores]  # a copy: restored if any slice refuses
        # Phase 2: apply on every slice.
        answers = []
        for i, (core, g) in enumerate(zip(self.cores, slices)):
            try:
                answers.append(core.push(worker, g, iteration_index))
            except PushRejected:
                if saved is not None:
                    for done_core, state in zip(self.cores[:i], saved):
                        done_core.load_state_dict(state)
                raise
        return self._joined(answers)

    def deactivate(self, worker: int) -> list[Dispatch]:
        return self._joined([core.deactivate(worker) for core in self.cores])

    def deactivate_all(self) -> None:
        for core in self.cores:
            core.deactivate_all()

    def rejoin(self, worker: int) -> Dispatch | None:
        answers = [core.rejoin(worker) for core in self.cores]
        if answers[0] is None:
            return None
        return self._joined([[a] for a in answers])[0]

    # ----- checkpoints: one consistent cut -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every slice's state at the same iteration, with the cuts (a checkpoint's manifest)."""
        return {"bounds": [list(b) for b in self.bounds], "shards": [core.state_dict() for core in self.cores]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [tuple(b) for b in state["bounds"]] != self.bounds:
            raise ValueError(f"the checkpoint's shards cut the parameter at {state['bounds']}; this run at "
                             f"{[list(b) for b in self.bounds]}")
        iterations = {s["iteration"] for s in state["shards"]}
        if len(iterations) != 1:
            raise ValueError(f"the checkpoint's shards are at different iterations {sorted(iterations)}: "
                             "not one consistent cut")
        for core, s in zip(self.cores, state["shards"]):
            core.load_state_dict(s)

