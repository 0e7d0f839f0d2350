"""Property-based tests of the service: random and malformed messages never crash it or change its state.

Every example has a server of its own (`fresh_server`: about 20 ms to start and stop on 2 cores), so what an
example proves does not depend on which examples hypothesis drew before it: a refused non-finite gradient
counts against its worker and, repeated, drops it or ends the run as diverged (server/faults.py), and a
byte string that decodes as a Register takes a worker id for as long as its stream lives. The examples
themselves are fixed (tests/conftest.py loads a derandomized hypothesis profile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from ormo_ps.server.config import RunConfig
from ormo_ps.common.pb import parameter_server_pb2 as pb
from tests.conftest import LiveServer, RawWorker, start_server

ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8}

ONE_WORKER_RUN = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32,
                           iterations=1_000_000)


@contextlib.contextmanager
def fresh_server() -> Iterator[LiveServer]:
    """A new one-worker server (a run far too long to finish) for one example, stopped after it."""
    live, stop = start_server(ONE_WORKER_RUN, bind="127.0.0.1:0", linger=0.0, grace=0.2, log_every=10**6)
    try:
        yield live
    finally:
        stop()


def snapshot(live):
    def take():
        core = live.service.core
        return core.w.clone(), core.iteration, {k: (v.clone() if hasattr(v, "clone") else v)
                                                for k, v in core.rule.state_dict().items()}
    return live.on_loop(take)


def same(a, b) -> bool:
    import torch

    return torch.equal(a[0], b[0]) and a[1] == b[1] and all(
        torch.equal(a[2][k], b[2][k]) if hasattr(a[2][k], "clone") else a[2][k] == b[2][k] for k in a[2])


gradients = st.fixed_dictionaries({
    "dtype": st.sampled_from([0, 1, 1, 1, 2, 3, 4, 99]),
    "numel_delta": st.sampled_from([0, 0, 0, -1, 1, None]),
    "length_delta": st.sampled_from([0, 0, 0, -1, 3]),
    "poison": st.sampled_from([None, None, "nan", "inf"]),
    "index_delta": st.sampled_from([0, 0, 1, -1, 10**9, None]),
    "loss": st.floats(allow_nan=True, allow_infinity=True),
})


WELL_FORMED = dict(dtype=1, numel_delta=0, length_delta=0, poison=None, index_delta=0, loss=2.3)


# Only about 1 in 27 drawn gradients is well formed: these cases are tried on every run, besides the 40 drawn.
@example(spec=WELL_FORMED)
@example(spec=WELL_FORMED | {"poison": "nan"})
@example(spec=WELL_FORMED | {"poison": "inf", "loss": float("inf")})
@settings(max_examples=40)
@given(spec=gradients)
def test_random_gradients_are_applied_exactly_when_valid(spec):
    """A gradient is applied (the iteration advances, the worker gets the next parameters) if and only if it
    is valid; anything else ends its stream with INVALID_ARGUMENT and changes nothing. A non-finite one is
    the first its server sees (one is refused, whatever the rule that drops a worker or ends a run)."""
    with fresh_server() as live:
        _push_one_gradient(live, spec)


def _push_one_gradient(live: LiveServer, spec: dict) -> None:
    w = RawWorker(live.stub())
    try:
        n = w.register(worker_id=0).config.num_parameters
        w.ready()
        params = w.parameters()
        index = params.iteration_index
        numel = n + spec["numel_delta"] if spec["numel_delta"] is not None else 7
        values = np.full(max(numel, 0), 1e-3, dtype=np.float32)
        if spec["poison"] and numel > 0:
            values[numel // 2] = np.nan if spec["poison"] == "nan" else np.inf
        # the bytes of `numel` elements of the declared dtype (float32 values reinterpreted for the others)
        raw = values.tobytes()[: max(numel, 0) * ITEMSIZE.get(spec["dtype"], 4)]
        raw = raw.ljust(max(numel, 0) * ITEMSIZE.get(spec["dtype"], 4), b"\0")
        raw = raw + b"\0" * spec["length_delta"] if spec["length_delta"] >= 0 else raw[: spec["length_delta"]]
        ite = index + spec["index_delta"] if spec["index_delta"] is not None else -5
        msg = pb.WorkerMessage(gradient=pb.Gradient(
            tensor=pb.Tensor(dtype=spec["dtype"], numel=max(numel, 0), data=raw), iteration_index=ite,
            loss=spec["loss"], sample_count=32))
        well_formed = spec["dtype"] == 1 and numel == n and spec["length_delta"] == 0 and spec["index_delta"] == 0
        valid = well_formed and spec["poison"] is None
        event("applied" if valid else f"refused: {spec['poison']}" if well_formed else "refused: malformed")
        before = snapshot(live)
        w.send(msg)
        if valid:
            reply = w.parameters()
            assert reply.iteration_index == index + 1
            assert snapshot(live)[1] == before[1] + 1
        else:
            err = w.expect_abort()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert same(before, snapshot(live))
    finally:
        w.close()


@settings(max_examples=25)
@given(blob=st.binary(min_size=0, max_size=64))
def test_undecodable_bytes_never_crash_the_server(blob):
    with fresh_server() as live:
        _send_bytes(live, blob)


def _send_bytes(live: LiveServer, blob: bytes) -> None:
    before = snapshot(live)
    channel = live.channel()
    train = channel.stream_stream("/ps.v1.ParameterServer/Train", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
    try:
        replies = list(train(iter([blob]), timeout=5))
        # Some byte strings are valid (e.g. empty = an empty WorkerMessage): then only refusals or a Welcome
        assert all(isinstance(r, bytes) for r in replies)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert same(before, snapshot(live))
    status = live.stub().GetStatus(pb.GetStatusRequest(), timeout=5)  # still serving
    assert status.iteration == before[1]
