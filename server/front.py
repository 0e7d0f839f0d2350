"""The coordinator of a sharded server: one order for S shards, without seeing a tensor.

`ShardFront` is the service's core when the server is sharded (`ps-server --shards S`): a `ServerCore` over an
empty vector, so that it makes every scheduling decision one server makes (the iteration t, the waiting set,
the workers' indexes, OrMo's gradient groups, eta_t, OrMo-DA's tau, Ringmaster's discards) with no
parameters, and a link to each shard (server/shard.py) that carries the same commands, in the same order, to
every shard. Each shard's core makes the same decisions on its slice: after every push the slices put together
are one server's parameters, bit for bit.

A push, from the worker's side: it sends slice i of its gradient to shard i. Each shard checks its slice (size,
dtype, finite) and reports its verdict here; once all S verdicts of the push are in, the push is decided for the
whole (`_decide`): the worker's state (its index, active, the run not over) is checked here first, as one server
checks it first; then one bad slice refuses the push everywhere (ShardDrop); a good one becomes the next push
(ShardPush, with the whole gradient's largest magnitude) on every shard.

Overflow: one server proves from a bound it keeps that an update cannot make its state non-finite, and only when
it cannot prove it applies the update with a copy kept. Here every shard and this front keep the same bound (the
whole vector's, from the whole gradient's largest magnitude), so all know at once when an update cannot be proved
finite: then the push is a trial (every shard applies it with its state saved and says whether its slice stayed
finite) and, once every answer is in, it is kept or undone everywhere (ShardResolve). Meanwhile nothing else is
decided (`_busy`): what comes waits in `_backlog`, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from ormo_ps.common.codec import decode, encode
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import Dispatch, PushRejected, ServerCore
from ormo_ps.server.shard import CONTROL_SERVICE
from ormo_ps.server.shards import shard_bounds

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"  # the shards' state files of a checkpoint, under the run's directory


class ShardLost(RuntimeError):
    """A shard's stream ended or it could not carry out a command: the run cannot go on."""


class ShardLink:
    """The coordinator's Follow stream to one shard: commands out in order (`send`), reports in (`reports`)."""

    def __init__(self, index: int, address: str, security: Any) -> None:
        self.index = index
        self.address = address
        self.security = security
        self.channel: grpc.aio.Channel | None = None
        self.call: Any = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._seq = 0
        self._answers: dict[int, asyncio.Future] = {}

    async def open(self, on_report: Callable[[int, pb.ShardReport], None],
                   on_lost: Callable[[int, str], None], timeout: float = 60.0) -> None:
        self.channel = self.security.aio_channel(self.address, GRPC_OPTIONS)
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise ShardLost(f"shard {self.index} at {self.address} is unreachable (no connection within "
                            f"{timeout:g}s)") from None
        follow = self.channel.stream_stream(f"/{CONTROL_SERVICE}/Follow",
                                            request_serializer=pb.ShardCommand.SerializeToString,
                                            response_deserializer=pb.ShardReport.FromString)
        self.call = follow(self._commands(), metadata=self.security.call_metadata())
        self._reader = asyncio.create_task(self._read(on_report, on_lost), name=f"shard-{self.index}-reports")

    async def _commands(self) -> AsyncIterator[pb.ShardCommand]:
        while (command := await self._queue.get()) is not None:
            yield command

    async def _read(self, on_report: Callable[[int, pb.ShardReport], None],
                    on_lost: Callable[[int, str], None]) -> None:
        why = "its stream ended"
        try:
            async for report in self.call:
                if report.seq and report.seq in self._answers:
                    future = self._answers.pop(report.seq)
                    if not future.done():
                        future.set_result(report)
                    if report.WhichOneof("report") == "failed":
                        on_lost(self.index, report.failed)
                    continue
                on_report(self.index, report)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
        for future in self._answers.values():
            if not future.done():
                future.set_exception(ShardLost(f"shard {self.index} at {self.address} was lost ({why})"))
        self._answers.clear()
        on_lost(self.index, f"shard {self.index} at {self.address} was lost ({why})")

    def send(self, answer: bool = False, **command: Any) -> asyncio.Future | None:
        """Queue a command (in order); with `answer`, a future of the shard's report on it."""
        self._seq += 1
        future = None
        if answer:
            future = asyncio.get_running_loop().create_future()
            self._answers[self._seq] = future
        self._queue.put_nowait(pb.ShardCommand(seq=self._seq, **command))
        return future

    async def close(self, timeout: float = 5.0) -> None:
        """End the stream: the commands queued go first (the shard ends its side once it has read them)."""
        self._queue.put_nowait(None)
        if getattr(self, "_reader", None) is not None:
            await asyncio.wait([self._reader], timeout=timeout)
        if self.call is not None:
            self.call.cancel()
        if getattr(self, "_reader", None) is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close()


@dataclass
class Partial:
    """The verdicts of one push come so far."""

    session: int
    iteration_index: int
    verdicts: dict[int, pb.ShardVerdict] = field(default_factory=dict)


@dataclass(frozen=True)
class PushOutcome:
    """How a push ended: applied, discarded (the rule ignored it), or refused (`rejected`)."""

    worker: int
    session: int
    iteration_index: int
    loss: float
    applied: bool = False
    discarded: bool = False
    rejected: PushRejected | None = None


def _answer(report: pb.ShardReport, what: str, index: int) -> Any:
    kind = report.WhichOneof("report")
    if kind == "failed":
        raise ShardLost(report.failed)
    if kind != what:
        raise ShardLost(f"shard {index} answered {kind} where {what} was due")
    return getattr(report, what)


class ShardFront(ServerCore):
    """The run's core on the coordinator: the scheduling of one server over no parameters, and S shards that
    hold them (see the module's docstring). `connect` before use."""

    def __init__(self, params0: torch.Tensor, run: RunConfig, iterations_per_epoch: int, addresses: list[str],
                 security: Any, chunk_bytes: int) -> None:
        if params0.numel() == 0:
            raise ValueError("a sharded server needs the run's model (--model client is not sharded)")
        super().__init__(torch.empty(0, dtype=params0.dtype), run, iterations_per_epoch)
        self._numel = params0.numel()
        self._params0 = params0
        self.iterations_per_epoch = iterations_per_epoch
        self.bounds = shard_bounds(self._numel, len(addresses))
        self.addresses = addresses
        self.links = [ShardLink(i, a, security) for i, a in enumerate(addresses)]
        self.chunk_bytes = chunk_bytes
        self.sessions: dict[int, int] = {}  # worker -> its current session (0: none)
        self._next_session = 1
        self._admitted: dict[int, list[asyncio.Future]] = {}
        self.partial: dict[int, Partial] = {}
        self._busy = False
        self._backlog: deque[Callable[[], None]] = deque()
        self.on_outcome: Callable[[PushOutcome], None] = lambda outcome: None
        self.on_lost: Callable[[str], None] = lambda why: None
        self.halted: Callable[[], bool] = lambda: False  # the run ended otherwise (diverged): no more pushes
        self.on_dispatch: Callable[[list[Dispatch]], None] = lambda dispatches: None  # what the shards now send
        self.lost: str | None = None
        self._closing = False
        self._empty = torch.empty(0, dtype=params0.dtype)
        self.trials = 0

    # ----- the parameters' size and place (the core's own vector is empty) --------------------------------
    @property
    def numel(self) -> int:
        return self._numel

    @property
    def has_parameters(self) -> bool:
        return True

    def endpoints(self, advertise: list[str] | None = None) -> list[pb.ShardEndpoint]:
        names = advertise or self.addresses
        return [pb.ShardEndpoint(address=a, start=s, end=e) for a, (s, e) in zip(names, self.bounds)]

    # ----- attaching -------------------------------------------------------------------------------------
    async def connect(self, timeout: float = 60.0) -> None:
        """Open every shard's stream and attach it to the run with its slice of w_0."""
        run_json = json.dumps(self.run.to_dict())
        futures = []
        for link, (start, end) in zip(self.links, self.bounds):
            await link.open(self._on_report, self._on_lost, timeout)
            attach = pb.ShardAttach(run_json=run_json, iterations_per_epoch=self.iterations_per_epoch,
                                    index=link.index, shards=len(self.links), start=start, end=end,
                                    numel=self._numel, params=encode(self._params0[start:end]),
                                    chunk_bytes=self.chunk_bytes)
            futures.append(link.send(answer=True, attach=attach))
        reports = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        self._bound = max(_answer(r, "attached", i).bound for i, r in enumerate(reports))
        self._params0 = None  # (only the shards keep the parameters)
        logger.info("attached %d shards: %s", len(self.links),
                    ", ".join(f"{a} [{s}, {e})" for a, (s, e) in zip(self.addresses, self.bounds)))

    async def close(self, finish: pb.ServerMessage | None = None) -> None:
        """Detach from the shards; `finish` (the run's Stop, when it ended) tells them the run is over first."""
        self._closing = True
        if finish is not None and self.lost is None:
            self._broadcast(finish=pb.ShardFinish(stop=finish.stop))
        await asyncio.gather(*(link.close() for link in self.links))

    def _on_lost(self, index: int, why: str) -> None:
        if self._closing:
            return
        if self.lost is None:
            self.lost = why
            logger.error("%s: the run cannot go on", why)
            self.on_lost(why)

    def _broadcast(self, answer: bool = False, **command: Any) -> list[asyncio.Future | None]:
        return [link.send(answer=answer, **command) for link in self.links]

    async def _gather(self, futures: list[asyncio.Future | None], what: str) -> list[Any]:
        reports = await asyncio.gather(*futures)
        return [_answer(r, what, i) for i, r in enumerate(reports)]

    # ----- in order: while a trial push waits for its answers, everything else waits ------------------------
    def _in_order(self, action: Callable[[], None]) -> None:
        if self._busy:
            self._backlog.append(action)
        else:
            action()

    def _free(self) -> None:
        self._busy = False
        while self._backlog and not self._busy:
            self._backlog.popleft()()

    # ----- sessions ----------------------------------------------------------------------------------------
    def new_session(self, worker: int, name: str) -> int:
        """A worker registered: its session, announced to every shard (`admitted` waits for their answers)."""
        session = self._next_session
        self._next_session += 1
        self.sessions[worker] = session
        self.partial.pop(worker, None)
        self._admitted[worker] = self._broadcast(answer=True, admit=pb.ShardAdmit(worker=worker, session=session,
                                                                                   name=name))
        return session

    async def admitted(self, worker: int) -> None:
        """Every shard knows the worker's session (its streams to them may open); ShardLost otherwise."""
        futures = self._admitted.pop(worker, [])
        await self._gather(futures, "done")

    # ----- the core's driving, as commands -----------------------------------------------------------------
    def start_with(self, ready: set[int] | list[int]) -> Dispatch:
        dispatch = super().start_with(ready)  # (ServerCore's own start and deactivate: no command of their own)
        self._broadcast(start=pb.ShardStart(ready=sorted(ready)))
        return dispatch

    def rejoin(self, worker: int) -> Dispatch | None:
        def act() -> None:
            dispatch = ServerCore.rejoin(self, worker)
            self._broadcast(rejoin=pb.ShardRejoin(worker=worker))
            self.on_dispatch([dispatch] if dispatch is not None else [])

        self._in_order(act)
        return None

    def deactivate(self, worker: int) -> list[Dispatch]:
        """Dropped from the barrier (a silent worker): its session goes on."""
        self.disconnect(worker, deactivate=True, end_session=False)
        return []

    def disconnect(self, worker: int, *, deactivate: bool, end_session: bool = True) -> None:
        """The worker's session is over (its stream ended); `deactivate`: in the core too (a started run)."""
        if end_session:
            self.sessions.pop(worker, None)
            self.partial.pop(worker, None)

        def act() -> None:
            dispatches = ServerCore.deactivate(self, worker) if deactivate else []
            self._broadcast(deactivate=pb.ShardDeactivate(worker=worker, end_session=end_session, core=deactivate))
            self.on_dispatch(dispatches)

        self._in_order(act)

    def deactivate_all(self) -> None:
        super().deactivate_all()
        self.sessions.clear()
        self.partial.clear()
        self._broadcast(deactivate_all=pb.ShardDeactivateAll())

    def push(self, worker: int, grad: torch.Tensor, iteration_index: int) -> list[Dispatch]:
        raise RuntimeError("a sharded server's gradients go to its shards, not to the coordinator")

    def current_params(self) -> torch.Tensor:
        raise RuntimeError("a sharded server's parameters are its shards': use fetch_params()")

    # ----- pushes ------------------------------------------------------------------------------------------
    def _on_report(self, index: int, report: pb.ShardReport) -> None:
        if report.WhichOneof("report") != "verdict":
            return
        v = report.verdict
        if self.sessions.get(v.worker) != v.session:
            return  # of a session that is over (its slices were dropped with it)
        p = self.partial.get(v.worker)
        if p is None or (p.session, p.iteration_index) != (v.session, v.iteration_index):
            p = self.partial[v.worker] = Partial(v.session, v.iteration_index)
        p.verdicts[index] = v
        if len(p.verdicts) == len(self.links):
            del self.partial[v.worker]
            self._in_order(lambda: self._decide(v.worker, p))

    def _decide(self, worker: int, p: Partial) -> None:
        """All S verdicts of a push are in: refuse it everywhere, or make it the next push everywhere."""
        if self.sessions.get(worker) != p.session:
            return  # the worker's session ended while the push waited (its slices were dropped with it)
        if self.done or self.halted():  # in flight when the run ended (or diverged): dropped, as one server drops it
            self._broadcast(drop=pb.ShardDrop(worker=worker, session=p.session))
            return
        first = p.verdicts[0]
        outcome = dict(worker=worker, session=p.session, iteration_index=p.iteration_index, loss=first.loss)
        try:
            self.check_push(worker, p.iteration_index)
            for i in range(len(self.links)):
                v = p.verdicts[i]
                if not v.ok:
                    lo, hi = self.bounds[i]
                    raise PushRejected(v.code or "INVALID_ARGUMENT",
                                       f"{v.message} (shard {i}: parameters [{lo}, {hi}))", reason=v.reason or None)
        except PushRejected as e:
            self._broadcast(drop=pb.ShardDrop(worker=worker, session=p.session))
            self.on_outcome(PushOutcome(**outcome, rejected=e))
            return
        g_max = max(v.g_max for v in p.verdicts.values())
        ite = p.iteration_index
        if self.discarding(ite):
            self._broadcast(push=pb.ShardPush(worker=worker, session=p.session, iteration_index=ite, g_max=g_max))
            self.on_dispatch(self.discard(worker))
            self.on_outcome(PushOutcome(**outcome, discarded=True))
            return
        lr = self.update_rate(ite)
        predicted = self._predicted_bound(lr, g_max)
        if self.run.allow_nonfinite or (math.isfinite(predicted) and predicted <= self._safe_magnitude):
            self._broadcast(push=pb.ShardPush(worker=worker, session=p.session, iteration_index=ite, g_max=g_max))
            self.apply_update(self._empty, ite, worker, lr)
            self._bound = predicted
            self.on_dispatch(self.applied(worker, ite, lr))
            self.on_outcome(PushOutcome(**outcome, applied=True))
            return
        # Not provably finite: a trial on every shard; nothing else is decided until it is kept or undone.
        self._busy = True
        self.trials += 1
        futures = self._broadcast(answer=True, push=pb.ShardPush(worker=worker, session=p.session,
                                                                 iteration_index=ite, g_max=g_max, trial=True))
        asyncio.get_running_loop().create_task(self._resolve(futures, worker, ite, lr, g_max, outcome))

    async def _resolve(self, futures: list, worker: int, ite: int, lr: float, g_max: float,
                       outcome: dict[str, Any]) -> None:
        try:
            trials = await self._gather(futures, "trial")
        except ShardLost:
            return  # (the run stops: _on_lost)
        if all(t.finite for t in trials):
            self._bound = max(t.bound for t in trials)
            self._broadcast(resolve=pb.ShardResolve(commit=True, bound=self._bound))
            self.apply_update(self._empty, ite, worker, lr)
            self.on_dispatch(self.applied(worker, ite, lr))
            self.on_outcome(PushOutcome(**outcome, applied=True))
        else:
            self._bound = max(t.bound_before for t in trials)
            self._broadcast(resolve=pb.ShardResolve(commit=False, bound=self._bound))
            bad = [i for i, t in enumerate(trials) if not t.finite]
            self.on_outcome(PushOutcome(**outcome, rejected=PushRejected(
                "INVALID_ARGUMENT", f"applying this gradient would make the server's parameters non-finite (on shards "
                f"{bad}; |eta*g| up to {abs(lr) * g_max:.3g}): refused, nothing changed; the run is diverging "
                "(eta too large?)", reason="overflow")))
        self._free()

    # ----- the parameters, put together; checkpoints ---------------------------------------------------------
    async def fetch_params(self) -> tuple[torch.Tensor, int]:
        """(w_t, t): every shard's slice at the same point of the order, put together."""
        slices = await self._gather(self._broadcast(answer=True, snapshot=pb.ShardSnapshot()), "slice")
        iterations = {s.iteration for s in slices}
        if len(iterations) != 1:
            raise ShardLost(f"the shards' snapshots are at different iterations {sorted(iterations)}")
        params = torch.cat([decode(s.params, expected_numel=e - b, expected_dtype=torch.float32)
                            for s, (b, e) in zip(slices, self.bounds)])
        return params, iterations.pop()

    async def checkpoint_shards(self, out_dir: Path) -> list[dict[str, Any]]:
        """Every shard writes its state at the same point of the order: the manifest of their files."""
        directory = out_dir / SHARDS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        futures = [link.send(answer=True, checkpoint=pb.ShardCheckpoint(
            path=str(directory / f"shard-{link.index}-of-{len(self.links)}.pt"))) for link in self.links]
        written = await self._gather(futures, "checkpointed")
        return [{"path": str(Path(w.path).relative_to(out_dir)), "sha256": w.sha256, "iteration": w.iteration,
                 "start": b, "end": e} for w, (b, e) in zip(written, self.bounds)]

    async def load_shards(self, out_dir: Path, manifest: list[dict[str, Any]], iteration: int) -> None:
        """Every shard loads its file of a checkpoint's manifest (its digest checked)."""
        if [(m["start"], m["end"]) for m in manifest] != [tuple(b) for b in self.bounds]:
            raise ValueError(f"the checkpoint's shards cut the parameters at "
                             f"{[(m['start'], m['end']) for m in manifest]}; this run at {self.bounds} (another "
                             "--shards?)")
        futures = [link.send(answer=True, load=pb.ShardLoad(path=str(out_dir / m["path"]), sha256=m["sha256"]))
                   for link, m in zip(self.links, manifest)]
        loaded = await self._gather(futures, "loaded")
        if any(x.iteration != iteration for x in loaded):
            raise ValueError(f"the checkpoint's shards are at iterations {[x.iteration for x in loaded]}, its "
                             f"coordinator at {iteration}: not one consistent cut")
        self._bound = max(x.bound for x in loaded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bound = self._bound  # the shards' (load_shards): the core's own vector is empty
        super().load_state_dict(state)
        self._bound = bound
