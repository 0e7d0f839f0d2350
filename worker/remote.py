"""RemoteOptimizer: your model, your data and your training loop; the update rule runs on a parameter server.

    opt = RemoteOptimizer(model, server="host:50051")
    while not opt.done:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(loss=loss)

It is a worker like ps-worker (`ormo_ps.worker.client.Worker`: the same Train stream, reconnects, token and TLS)
whose gradients come from the user's loop instead of the project's: `step()` sends the flat gradient with
the iteration index of the parameters the model holds, and loads the parameters the server answers with.
The server applies its configured rule (OrMo orders the gradients by that index; nothing is asked of the
user). The stream runs on an asyncio loop in a background thread; the user's thread blocks in `step()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import torch
from torch import nn

from ormo_ps.common.codec import CodecError, decode
from ormo_ps.common.tensor_checks import check_finite
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.layout import layout_of, numel, to_pb
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.security import ClientSecurity
from ormo_ps.worker.client import WorkerError, Worker, WorkerOptions, widened

logger = logging.getLogger(__name__)

__all__ = ["RemoteOptimizer", "ServerError"]

FINAL_FETCH_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """The server refused this client (`code`: the gRPC status name, e.g. FAILED_PRECONDITION for a model whose
    parameter layout is not the run's), or stopped or could not be reached before the run's end (`code` None)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Background:
    """An asyncio event loop in a daemon thread, for the client's stream; `close()` cancels what runs on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.closed = False
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def submit(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if threading.current_thread() is not self.thread:
            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout)
            except Exception:  # noqa: BLE001 - closing must not fail; the thread is a daemon
                logger.debug("closing the client's loop", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class _ClientWorker(Worker):
    """The stream of a RemoteOptimizer: declares its layout in Register, sends its parameters when the run
    asks for w_0, and hands each Parameters to the user's thread and the user's gradient back."""

    def __init__(self, options: WorkerOptions, owner: RemoteOptimizer) -> None:
        super().__init__(options)
        self.owner = owner

    def _register(self) -> pb.Register:
        register = super()._register()
        register.layout.CopyFrom(to_pb(self.owner.layout))
        return register

    def _on_welcome(self, welcome: pb.Welcome) -> pb.Ready:
        owner, cfg = self.owner, welcome.config
        self.worker_id = welcome.worker_id
        if not welcome.HasField("layout") and cfg.num_parameters != owner.numel:  # a server of an earlier version
            raise ServerError(f"the model has {owner.numel} parameters, the server's has {cfg.num_parameters}",
                              "FAILED_PRECONDITION")
        owner._configure(cfg)
        # The run names no model: this client's parameters may become w_0 (sent with the Ready, chunked as
        # the Welcome says: the server's receive limit is a chunk then).
        self._w0 = owner._flat(lambda p: p) if welcome.parameters_wanted else None
        return pb.Ready()


    def _decode_parameters(self, tensor: pb.Tensor, data: memoryview | None, owned: bool) -> torch.Tensor:
        return widened(decode(tensor, expected_numel=self.owner.numel, expected_dtype=self._sender.wire_dtype,
                              data=data, copy=not owned))

    async def _gradient(self, params: torch.Tensor, iteration_index: int) -> list[bytes]:
        grad, loss, _ = await self._shard_gradient(params, iteration_index)
        return self._sender.gradient(grad, iteration_index, loss)

    async def _shard_gradient(self, params: torch.Tensor, iteration_index: int) -> tuple[torch.Tensor, float, int]:
        """The user's gradient at `params` (loaded into the model by the user's thread, in `step()`)."""
        owner = self.owner
        owner._inbox.put(("params", params, iteration_index))
        grad, loss = await owner._gradients.get()
        self.gradients_sent += 1
        return grad, loss, 0


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch.optim-style optimizer whose update happens on an OrMo-PS parameter server.

    `RemoteOptimizer(model, server="host:port")` connects, registers the model's parameter layout (names,
    shapes, dtypes of its trainable parameters), and blocks until the run starts (all K clients ready), then
    loads the run's parameters into `model`. Each `step()` sends the gradients of the model's parameters
    (`p.grad`, after your `loss.backward()`) with the iteration index of the parameters they were computed
    at, and loads the parameters the server answers with; the server applies its configured rule (`--algo`,
    `--lr` and its schedule, `--momentum`). When the run is finished, `done` turns true and the model holds
    the final parameters; later `step()`s do nothing.

    Weight decay: the server's rules never apply it; as ps-worker does, `step()` adds `weight_decay * p` to
    each gradient. `weight_decay=None` takes the run's (`ps-server --weight-decay`, default 1e-4); pass 0
    when your loss already has its L2 term.

    `server` and `token` default to the `PS_SERVER` and `PS_TOKEN` environment variables, as the commands'
    flags do; `tls_ca` (with `tls_cert`/`tls_key` for mutual TLS) turns TLS on. A server that refuses the
    client (a model whose layout is not the run's: FAILED_PRECONDITION, a wrong token: UNAUTHENTICATED) or
    stays unreachable for `server_timeout` seconds raises `ServerError`; a lost connection is re-established
    by itself (the gradient in flight is lost, as for ps-worker).

    BatchNorm running statistics are not parameters: the server never sees them; each client keeps its own.
    """

    def __init__(self, model: nn.Module, server: str | None = None, *, weight_decay: float | None = None,
                 token: str | None = None, token_file: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None,
                 name: str | None = None, server_timeout: float = 60.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        wrong = [(n, p.dtype) for n, p in named if p.dtype != torch.float32]
        if wrong:
            raise ValueError(f"the server holds float32 parameters; {wrong[0][0]} is {wrong[0][1]}")
        if weight_decay is not None and not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0 or None (the run's), got {weight_decay}")
        super().__init__([p for _, p in named], {})
        self._params = [p for _, p in named]
        self.layout = layout_of(model)
        self.numel = numel(self.layout)
        if token is None and not token_file:
            token = os.environ.get("PS_TOKEN") or None
        security = ClientSecurity(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name,
                                  token=token, token_file=token_file)
        self._options = WorkerOptions(server=server or os.environ.get("PS_SERVER") or "127.0.0.1:50051",
                                      name=name or f"{socket.gethostname()}:{os.getpid()}",
                                      server_timeout=server_timeout, security=security)
        self._weight_decay = weight_decay
        self.weight_decay = 0.0 if weight_decay is None else weight_decay
        self.run_config: dict[str, Any] = {}  # the run as the server's Welcome describes it
        self.iteration: int | None = None  # the iteration index of the parameters the model holds
        self.done = False
        self.stop_reason: str | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # the model's parameters: loaded by the user's thread, read by the stream's
        self._inbox: queue.Queue = queue.Queue()  # stream -> user: ("params", p, i) | ("done", ...) | ("error", e)
        self._gradients: asyncio.Queue = asyncio.Queue()  # user -> stream (filled on the loop's thread)
        self._client = _ClientWorker(self._options, self)
        self._background = _Background("ormo-ps-client")
        weakref.finalize(self, self._background.close)
        self._background.submit(self._serve())
        self._receive()  # the run's parameters (w_0 or the current ones), once it has started

    # ----- the user's side ----------------------------------------------------------------------------
    @property
    def worker_id(self) -> int | None:
        return self._client.worker_id

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | torch.Tensor | None = None) -> Any:
        """Send the model's gradients (+ weight decay) at `iteration` and load the server's answer. `loss`
        (or what `closure` returns) is reported to the server for its training-loss records. A non-finite
        gradient raises ValueError and sends nothing (the model keeps its parameters: skip the batch)."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            loss = result if loss is None else loss
        if self._error is not None:
            raise self._error
        if self.done:
            return result
        grad = self._flat(lambda p: p.grad)
        if self.weight_decay:
            grad.add_(self._flat(lambda p: p), alpha=self.weight_decay)
        try:
            check_finite(grad, "gradient")
        except CodecError as e:
            raise ValueError(f"{e}; nothing was sent and the model keeps its parameters") from None
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan" if loss is None else loss)
        self._background.call(self._gradients.put_nowait, (grad, loss_value))
        self._receive()
        return result

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "layout"):
            raise TypeError("a RemoteOptimizer trains the parameters of the model it was given; it takes no more")
        super().add_param_group(param_group)

    def close(self) -> None:
        """End the stream (the server counts this client as gone) and stop the background thread."""
        self._background.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self) -> None:
        """Wait for the stream's next word: parameters to load, the end of the run, or an error."""
        item = self._inbox.get()
        if item[0] == "params":
            self._load(item[1])
            self.iteration = item[2]
            return
        self.close()
        if item[0] == "error":
            self._error = item[1]
            raise self._error
        self.done, self.stop_reason = True, item[1]
        if item[2] is not None:
            self._load(item[2][0])
            self.iteration = item[2][1]

    def _flat(self, tensor_of: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
        """One flat float32 CPU vector of `tensor_of(p)` over the parameters (zeros where it is None)."""
        parts = []
        with self._lock:
            for p in self._params:
                t = tensor_of(p)
                if t is None:
                    parts.append(torch.zeros(p.numel(), dtype=torch.float32))
                else:
                    parts.append((t.to_dense() if t.is_sparse else t).detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(parts)

    def _load(self, vector: torch.Tensor) -> None:
        with self._lock, torch.no_grad():
            offset = 0
            for p in self._params:
                p.copy_(vector[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def _configure(self, cfg: pb.RunConfig) -> None:
        """What the Welcome says (called on the stream's side, before the first parameters arrive)."""
        self.run_config = {f.name: getattr(cfg, f.name) for f in cfg.DESCRIPTOR.fields}
        self.weight_decay = cfg.weight_decay if self._weight_decay is None else self._weight_decay

    # ----- the stream's side (on the background loop) ---------------------------------------------------
    async def _serve(self) -> None:
        try:
            result = await self._client.run()
        except asyncio.CancelledError:
            raise
        except WorkerError as e:
            message = (f"the server refused this client: {e.code}: {e.details}" if e.code is not None else str(e))
            self._inbox.put(("error", ServerError(message, e.code)))
            return
        except Exception as e:  # noqa: BLE001 - handed to the user's thread, raised there
            self._inbox.put(("error", e))
            return
        if result.stop_reason != "STOP_REASON_DONE":
            within = f"{self._options.server_timeout:g}s"
            why = {"server gone": f"unreachable for {within}",
                   "STOP_REASON_SHUTDOWN": f"shut down and not back within {within}"}.get(
                result.stop_reason, f"it ended this client's stream ({result.stop_reason})")
            self._inbox.put(("error", ServerError(f"the server {self._options.server} stopped before the run's "
                                                  f"end: {why}")))
            return
        try:
            final = await self._final_parameters()
        except ServerError as e:
            self._inbox.put(("error", e))
            return
        self._inbox.put(("done", result.stop_reason, final))

    async def _final_parameters(self) -> tuple[torch.Tensor, int] | None:
        """The run's final parameters (the stream's last answer was one iteration before them), or None."""
        security = self._options.security
        try:
            async with security.aio_channel(self._options.server, GRPC_OPTIONS) as channel:
                reply = await pb_grpc.ParameterServerStub(channel).GetParameters(
                    pb.GetParametersRequest(training_client=True), timeout=FINAL_FETCH_TIMEOUT,
                    metadata=security.call_metadata())
        except grpc.aio.AioRpcError as e:
            logger.warning("could not fetch the final parameters (%s: %s); the model keeps the last ones it was "
                           "sent", e.code().name, e.details())
            return None
        try:
            return decode(reply.tensor, expected_numel=self.numel, expected_dtype=torch.float32), reply.iteration_index
        except CodecError as e:  # a client that joined a finished run with a model that is not the run's
            raise ServerError(f"the run's final parameters do not fit this model: {e}", "FAILED_PRECONDITION") from None
