"""The transport's ceiling: a grpc.aio bidi server that speaks the Train protocol with no server logic.

Same service definition, same message and keepalive options as ps-server, same messages on the wire,
and the same hand-framed Train (de)serializers (`ormo_ps.common.wire`: the tensor's bytes are sliced out of the
request without a copy and copied once into the reply), so the same pusher processes
(bench/grad_pusher.py) drive it unchanged: Register -> Welcome (announcing `--numel`), Ready -> Parameters
(a prebuilt zero tensor), then every Gradient is answered at once by a Parameters message carrying the
gradient's own tensor back (same size) and the next iteration index. Chunking as ps-server's (`--chunk-mib`,
the same default): to a client that reads chunks, tensors above the size go chunked both ways; a chunked
gradient is put together (one copy, as ps-server does) before its answer goes out.
No checks, no update, no queue or reader task: one handler coroutine per stream. GetStatus reports the
number of gradients echoed as `gradients_applied`, so the benchmark reads both servers alike.

    python -m bench.grpc_echo --bind 127.0.0.1:0 --numel 269722     # prints "echo listening on HOST:PORT"
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np

from bench import harness
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.malloc_tuning import tune_malloc
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.chunks import DEFAULT_CHUNK_BYTES, MIB, BufferPool
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.server.servicer import add_to_server


class EchoService(pb_grpc.ParameterServerServicer):
    def __init__(self, numel: int, chunk_bytes: int, wire_dtype: int = pb.DTYPE_FLOAT32) -> None:
        self.numel = numel
        self.chunk_bytes = chunk_bytes
        self.buffers = BufferPool()  # receive buffers used again, as ps-server's
        self.echoed = 0
        self.started = time.monotonic()
        self.config = pb.RunConfig(algorithm="echo", model=f"flat-{numel}", dataset="none", num_classes=1,
                                   batch_size=128, total_iterations=0, num_workers=0, num_parameters=numel,
                                   wire_dtype=wire_dtype)
        # w_0 in the run's wire dtype, as ps-server sends it (zeros: the same bits in every dtype's layout)
        self.initial = ((wire_dtype, np.zeros(numel, dtype="<i2")) if wire_dtype != pb.DTYPE_FLOAT32
                        else np.zeros(numel, dtype=np.float32))
        self.next_id = 0

    async def Train(self, request_iterator, context):
        # As ps-server's streams: one Sender and one Receiver (common/transport.py); no dtype or size checks
        # beyond the receiver's own. (A chunked gradient's bytes are read below, before the next `take`.)
        sender, incoming = Sender(), Receiver(self.buffers)
        async for received in request_iterator:
            received = incoming.take(received)
            if received is None:
                continue
            msg = received.message
            kind = msg.WhichOneof("payload")
            if kind == "gradient":
                g = msg.gradient
                self.echoed += 1
                # One copy of the tensor's bytes, as ps-server's reply costs; back in the dtype it came in.
                data = received.tensor_data if received.tensor_data is not None else g.tensor.data
                tensor = (g.tensor.dtype, np.frombuffer(data, dtype=np.float32 if g.tensor.dtype == pb.DTYPE_FLOAT32
                                                        else "<i2"))
                for reply in sender.parameters(tensor, g.iteration_index + 1, 0.0):
                    yield reply
            elif kind == "register":
                self.next_id += 1
                sender.chunk_bytes = incoming.chunk_bytes = self.chunk_bytes if msg.register.accepts_chunks else 0
                yield pb.ServerMessage(welcome=pb.Welcome(worker_id=self.next_id - 1, config=self.config,
                                                          chunk_bytes=sender.chunk_bytes))
            elif kind == "ready":
                for reply in sender.parameters(self.initial, 0, 0.0):
                    yield reply

    async def GetStatus(self, request, context):
        return pb.Status(iteration=self.echoed, gradients_applied=self.echoed, config=self.config,
                         uptime_seconds=time.monotonic() - self.started)


async def serve(bind: str, numel: int, chunk_bytes: int, wire_dtype: int = pb.DTYPE_FLOAT32) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_to_server(EchoService(numel, chunk_bytes, wire_dtype), server)  # ps-server's registration: the same Train serializers
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind {bind}")
    await server.start()
    print(f"echo listening on {bind.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    p = harness.parser("grpc_echo", __doc__)
    p.add_argument("--bind", default="127.0.0.1:0")
    p.add_argument("--numel", type=int, required=True, help="parameters announced in the Welcome")
    p.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / MIB,
                   help="chunk tensors larger than this (MiB) as ps-server --chunk-mib does; 0: whole")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the wire dtype its Welcome announces, as ps-server --wire-dtype")
    args = p.parse_args(argv)
    tune_malloc()  # as ps-server does: the ceiling gets the same allocator settings
    if not args.bind.startswith("127.0.0.1:"):
        p.error("the benchmark listens on 127.0.0.1 only")
    wire = {"float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16, "float16": pb.DTYPE_FLOAT16}[args.wire_dtype]
    asyncio.run(serve(args.bind, args.numel, round(args.chunk_mib * MIB), wire))


if __name__ == "__main__":
    main()
