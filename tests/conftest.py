"""Shared fixtures: a real `ps-server` on 127.0.0.1:0 in a background thread, and raw Train-stream clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import hypothesis
import pytest

from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.common.security import ServerSecurity
from ormo_ps.server.config import RunConfig
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.server.cli import ServeOptions, serve_run
from ormo_ps.server.service import ParameterServerService

T = TypeVar("T")

# Property tests (hypothesis) are deterministic in the suite: every run on every machine tries the same
# examples (derandomize: each test's examples come from a seed fixed by the test), no example database (a run
# would otherwise replay the failures an earlier run saved first, and test something else), a fixed number of
# examples where a test names none, no deadline and no too_slow health check (both measure time: a loaded
# machine must not fail a test), and a failure prints the blob that reproduces it (@reproduce_failure).
# HYPOTHESIS_PROFILE=explore draws new random examples (and keeps a database) to look for new failures.
hypothesis.settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "explore", derandomize=False, max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

START_TIMEOUT = 30.0  # seconds for the server to load its data, build the model and bind
STOP_TIMEOUT = 15.0  # seconds for a clean shutdown (grace + the loop's own cleanup)
STREAM_DEADLINE = 20.0  # deadline of every Train stream a test opens: bounds every blocking read


@dataclass
class LiveServer:
    """A real server running on its own event loop in a background thread."""

    port: int
    service: ParameterServerService
    loop: asyncio.AbstractEventLoop
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop and return its result (thread-safe, bounded)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Call `fn()` on the server's loop, between two of its steps: a consistent view of its state."""

        async def run() -> T:
            return fn()

        return self.call(run(), timeout)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.target, options=GRPC_MESSAGE_OPTIONS)
        self.channels.append(ch)
        return ch

    def stub(self) -> pb_grpc.ParameterServerStub:
        return pb_grpc.ParameterServerStub(self.channel())


_CLOSE = object()


class RawWorker:
    """A hand-driven Train stream: synchronous gRPC, requests fed through a queue, one reply at a time."""

    def __init__(self, stub: pb_grpc.ParameterServerStub, deadline: float = STREAM_DEADLINE) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self.call: Any = None
        self.call = stub.Train(self._iterate(), timeout=deadline)

    def _iterate(self) -> Iterator[pb.WorkerMessage]:
        # Runs in gRPC's request-consumer thread; polls so it ends when the stream does (no leaked thread).
        while not self._closed.is_set():
            try:
                item = self._requests.get(timeout=0.05)
            except queue.Empty:
                if self.call is not None and self.call.done():
                    return
                continue
            if item is _CLOSE:
                return
            yield item

    def send(self, msg: pb.WorkerMessage) -> None:
        self._requests.put(msg)

    def recv(self) -> pb.ServerMessage:
        """The next server message; raises grpc.RpcError when the stream ended with a status."""
        return next(self.call)

    def register(self, worker_id: int | None = None, name: str = "raw") -> pb.Welcome:
        reg = pb.Register(name=name)
        if worker_id is not None:
            reg.requested_worker_id = worker_id
        self.send(pb.WorkerMessage(register=reg))
        msg = self.recv()
        assert msg.WhichOneof("payload") == "welcome", msg
        return msg.welcome

    def ready(self) -> None:
        self.send(pb.WorkerMessage(ready=pb.Ready()))

    def parameters(self) -> pb.Parameters:
        msg = self.recv()
        assert msg.WhichOneof("payload") == "parameters", msg
        return msg.parameters

    def expect_abort(self) -> grpc.RpcError:
        """Read until the stream ends; it must end with an error status, which is returned."""
        for _ in range(100):
            try:
                self.recv()
            except grpc.RpcError as e:
                return e
        raise AssertionError("the stream did not end")

    def close(self) -> None:
        """Half-close our side and cancel the call (idempotent)."""
        self._requests.put(_CLOSE)
        self._closed.set()
        self.call.cancel()


def start_server(run: RunConfig, *, grace: float = 1.0, security: ServerSecurity = ServerSecurity(),
                 **options: Any) -> tuple[LiveServer, Callable[[], None]]:
    """Start `serve_run(run, ServeOptions(**options))` on a fresh loop in a thread (no output directory
    unless `out` is given); return the live server and its stopper."""
    started: queue.Queue = queue.Queue()
    state: dict[str, Any] = {}
    serve_options = ServeOptions(**({"out": None} | options))

    async def main() -> None:
        state["task"] = asyncio.current_task()
        await serve_run(run, serve_options, security=security, grace=grace,
                        on_started=lambda service, port: started.put((service, port)))

    def target() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        state["loop"] = loop
        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001 - report start-up failures to the test thread
            started.put(e)
        finally:
            try:  # what asyncio.run does: cancel and await leftovers, then close
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    thread = threading.Thread(target=target, name="ps-server-under-test", daemon=True)
    thread.start()
    try:
        got = started.get(timeout=START_TIMEOUT)
    except queue.Empty:
        raise RuntimeError(f"the server did not start within {START_TIMEOUT}s") from None
    if isinstance(got, BaseException):
        thread.join(STOP_TIMEOUT)
        raise got
    service, port = got
    live = LiveServer(port=port, service=service, loop=state["loop"])

    def stop() -> None:
        for ch in live.channels:
            ch.close()
        if not live.loop.is_closed():  # (a run that ended, lingered and returned has closed it already)
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                live.loop.call_soon_threadsafe(state["task"].cancel)
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), f"the server thread did not stop within {STOP_TIMEOUT}s"

    return live, stop


@pytest.fixture
def start_live_server() -> Callable[..., tuple[LiveServer, Callable[[], None]]]:
    """`start_server` itself, for tests that control the server's lifetime."""
    return start_server


@pytest.fixture
def server() -> Iterator[LiveServer]:
    """A real server (ormo, K=2, digits/mlp, batch 32, a run far too long to finish) on 127.0.0.1:0."""
    run = RunConfig(algo="ormo", workers=2, dataset="digits", model="mlp", batch_size=32, iterations=1_000_000)
    live, stop = start_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, log_every=1000)
    try:
        yield live
    finally:
        stop()


@contextlib.contextmanager
def raw_worker_factory(live: LiveServer) -> Iterator[Callable[[], RawWorker]]:
    """A factory of RawWorker streams on `live`; every stream it made is closed on exit."""
    made: list[RawWorker] = []

    def make() -> RawWorker:
        w = RawWorker(live.stub())
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            w.close()


@pytest.fixture
def raw_workers(server: LiveServer) -> Iterator[Callable[[], RawWorker]]:
    """A factory of RawWorker streams on the server; every stream is closed at teardown."""
    with raw_worker_factory(server) as make:
        yield make
