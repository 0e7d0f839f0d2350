"""The baseline users would pick instead: a parameter server on torch.distributed.rpc, built like PyTorch's tutorials.

As in "Implementing a Parameter Server Using Distributed RPC Framework" and "Implementing Batch RPC
Processing Using Asynchronous Executions": rank 0 ("ps") holds a ParameterServer object created by
`get_parameter_server()` under a global lock; each worker rank gets an RRef to it with `rpc.remote`,
fetches the parameters once, then loops `rpc.rpc_sync(owner, ParameterServer.update_and_fetch,
args=(ps_rref, grad))`: the server applies the gradient under its lock with the tutorial's optimizer,
torch.optim.SGD(momentum=0.9) (asynchronous SGD with momentum, one gradient at a time), and returns the
parameters. The copy of the parameters is taken inside the lock (the tutorial returns the live model,
which a concurrent update could tear while it is serialised).

Backend: TensorPipe, rendezvous `tcp://127.0.0.1:PORT`, restricted to the `uv` (TCP) transport and the
`basic` channel with TP_SOCKET_IFNAME=lo, i.e. what it uses between machines, so it crosses the same
loopback TCP as gRPC (TensorPipe's shared-memory transport and CMA channel would bypass the network on
one host). No model compute: each worker sends the same small float32 gradient every time.

Counters go to the control file of bench/throughput (a pusher row per worker; the server's applied
count in the control row); the pause flag there holds the workers, the stop flag ends their loop.

    python -m bench.torch_rpc_ps --world K+1 --port P --numel N --control FILE      # all ranks
    python -m bench.torch_rpc_ps --rank R --world K+1 --port P --numel N --control FILE   # one rank

Without --rank this process imports torch once and forks the K+1 ranks (each then calls init_rpc on its
own, as a process started by torch.multiprocessing would): 65 ranks start in seconds instead of the
minute that 65 torch imports take on two cores, and share torch's pages copy-on-write.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed.rpc as rpc  # noqa: E402

from bench import harness  # noqa: E402
from bench.grad_pusher import (  # noqa: E402
    APPLIED, DONE, DOWN_BYTES, ERROR, FAILED, NUMEL, PAUSE, PAUSE_POLL, PAUSED, PID, READY, SENT, SERVER_PID, STATE, STOP,
    UP_BYTES, open_control, record_reply,
)
from ormo_ps.common.malloc_tuning import tune_malloc  # noqa: E402

PS_NAME = "ps"

param_server = None
global_lock = threading.Lock()
_control = None  # the control file, opened by every rank
_wire = torch.float32  # what gradients and parameters travel as (--wire-dtype): the server applies in float32


class ParameterServer:
    def __init__(self, numel: int, lr: float) -> None:
        self.w = torch.nn.Parameter(torch.randn(numel) * 0.01)
        self.optimizer = torch.optim.SGD([self.w], lr=lr, momentum=0.9)
        self.lock = threading.Lock()
        self.applied = 0

    def get_parameters(self) -> torch.Tensor:
        with self.lock:
            return self.w.detach().clone()

    @staticmethod
    def update_and_fetch(ps_rref: rpc.RRef, grad: torch.Tensor) -> torch.Tensor:
        self = ps_rref.local_value()
        with self.lock:
            self.w.grad = grad if grad.dtype == torch.float32 else grad.float()
            self.optimizer.step()
            self.applied += 1
            _control[-1, APPLIED] = self.applied
            return self.w.detach().clone() if _wire == torch.float32 else self.w.detach().to(_wire)


def get_parameter_server(numel: int = 0, lr: float = 0.01) -> ParameterServer:
    global param_server
    with global_lock:
        if param_server is None:
            param_server = ParameterServer(numel, lr)
        return param_server


def run_worker(rank: int, numel: int, max_round_trips: int, max_seconds: float) -> None:
    row, stop = _control[rank - 1], _control[-1]
    deadline = time.monotonic() + max_seconds
    ps_rref = rpc.remote(PS_NAME, get_parameter_server)
    params = ps_rref.rpc_sync().get_parameters()
    if params.numel() != numel:
        raise RuntimeError(f"the server has {params.numel()} parameters, expected {numel}")
    grad = (torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 1e-4).to(_wire)
    size = grad.element_size() * numel
    row[NUMEL], row[UP_BYTES], row[DOWN_BYTES] = numel, size, size  # tensor payload only
    row[STATE] = READY
    owner = ps_rref.owner()
    replies = 0
    while not stop[STOP] and replies < max_round_trips and time.monotonic() < deadline:
        if stop[PAUSE]:  # the orchestrator measures another system meanwhile
            row[PAUSED] = 1
            while stop[PAUSE] and not stop[STOP] and time.monotonic() < deadline:
                time.sleep(PAUSE_POLL)
            row[PAUSED] = 0
            continue
        row[SENT] += 1
        params = rpc.rpc_sync(owner, ParameterServer.update_and_fetch, args=(ps_rref, grad))
        replies += 1
        record_reply(row, replies)
    row[STATE] = DONE


def run_rank(args: argparse.Namespace, rank: int) -> None:
    global _control, _wire
    _control = open_control(args.control, args.world - 1)
    _wire = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.wire_dtype]
    tune_malloc()  # the same allocator settings as ps-server and its pushers: the designs are compared
    slot = rank - 1 if rank else -1
    if rank:
        _control[slot, PID] = os.getpid()
        torch.set_num_threads(1)  # workers compute nothing
    else:
        _control[-1, SERVER_PID] = os.getpid()
        get_parameter_server(args.numel, args.lr)  # before any worker can ask for it
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{args.port}", num_worker_threads=args.threads, rpc_timeout=args.rpc_timeout,
        _transports=["uv"], _channels=["basic"])
    name = PS_NAME if rank == 0 else f"worker{rank}"
    try:
        rpc.init_rpc(name, rank=rank, world_size=args.world, rpc_backend_options=options)
        if rank:
            run_worker(rank, args.numel, args.max_round_trips, args.max_seconds)
        else:
            print(f"torch-rpc ps ready on tcp://127.0.0.1:{args.port}", flush=True)
        rpc.shutdown()  # graceful: waits for every rank, so the server serves until all workers are done
    except BaseException as e:  # noqa: BLE001 - recorded for the orchestrator, then re-raised
        if rank:
            _control[slot, STATE] = FAILED
            _control[slot, ERROR] = 1
        print(f"torch-rpc rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        _control.flush()


def launch(args: argparse.Namespace) -> int:
    """Fork every rank from this process (torch imported once, no torch op run yet: fork-safe)."""
    children: list[int] = []
    libc = ctypes.CDLL(None, use_errno=True)

    def end_children(signum: int, frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, end_children)
    signal.signal(signal.SIGINT, end_children)
    try:
        for rank in range(args.world):
            pid = os.fork()
            if pid == 0:  # the rank: dies with the launcher, runs, never returns into the launcher's code
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                    run_rank(args, rank)
                    code = 0
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.append(pid)
        failed = 0
        for pid in children:
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0
        return 1 if failed else 0
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("torch_rpc_ps", __doc__)
    p.add_argument("--rank", type=int, default=None, help="run this one rank (default: fork all of them)")
    p.add_argument("--world", type=int, required=True, help="K workers + 1 server")
    p.add_argument("--port", type=int, required=True, help="rendezvous port on 127.0.0.1")
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=16, help="TensorPipe RPC worker threads")
    p.add_argument("--max-round-trips", type=int, default=10**9)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--rpc-timeout", type=float, default=300.0)
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="gradients and parameters sent as this (the server applies in float32)")
    args = p.parse_args(argv)
    if args.rank is None:
        return launch(args)
    run_rank(args, args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
