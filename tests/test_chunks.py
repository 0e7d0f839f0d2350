"""Chunked tensors on the Train stream (`ps-server --chunk-mib`): the pieces, their framing, the service's
reassembly against real clients, and every bad chunk sequence.

The server here chunks at 0.01 MiB (10,486 bytes), so the digits MLP's 38,440-byte tensors travel as four
pieces each way; what is checked is that a chunked gradient changes the server exactly as the same gradient
sent whole, that a client that does not ask for chunks gets whole messages, and that a bad chunk sequence
ends its stream with INVALID_ARGUMENT, changes nothing, and the run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

from ormo_ps.common.chunks import MIB, Assembly, BufferPool, ChunkError, pieces
from ormo_ps.common.codec import CodecError, chunked_nbytes, decode, encode
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.wire import gradient_messages, parameters_messages, parse_server_message, parse_worker_message
from ormo_ps.server.config import RunConfig
from tests.conftest import LiveServer, RawWorker, raw_worker_factory
from tests.test_service import (NUM_PARAMETERS, RPC_TIMEOUT, assert_aborted, assert_same_state, counters,
                                good_gradient, gradient_message, reference_core, snapshot)
from ormo_ps.worker.client import Worker, WorkerOptions

CHUNK_MIB = 0.01
CHUNK = round(CHUNK_MIB * MIB)  # 10,486 bytes
NBYTES = 4 * NUM_PARAMETERS  # 38,440: four chunks
OFFSETS = [0, CHUNK, 2 * CHUNK, 3 * CHUNK]


# ----- the pieces and their assembly ---------------------------------------------------------------
def test_pieces_cover_the_bytes_in_order_and_small_tensors_stay_whole():
    assert pieces(NBYTES, CHUNK) == [(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, NBYTES)]
    assert pieces(NBYTES, NBYTES) == [(0, NBYTES)]  # not larger than a chunk: whole
    assert pieces(NBYTES, 0) == [(0, NBYTES)]  # chunking off
    assert pieces(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="chunk_bytes must be >= 0"):
        pieces(8, -1)


def test_an_assembly_takes_chunks_in_order_and_refuses_anything_else():
    data = np.arange(10, dtype=np.uint8).tobytes()
    a = Assembly("header", 10)
    assert not a.add(0, data[:4]) and a.progress() == "byte 4 of 10"
    with pytest.raises(ChunkError, match="only 4 of the tensor's 10 bytes arrived"):
        a.data()
    with pytest.raises(ChunkError, match="chunk at byte 0, expected the one at byte 4 of 10"):
        a.add(0, data[:4])  # repeated
    with pytest.raises(ChunkError, match="chunk at byte 8, expected the one at byte 4"):
        a.add(8, data[8:])  # skipped one
    with pytest.raises(ChunkError, match="empty chunk at byte 4"):
        a.add(4, b"")
    with pytest.raises(ChunkError, match="chunk of 7 bytes at byte 4 runs past the tensor's 10 bytes"):
        a.add(4, data[4:] + b"x")
    assert a.filled == 4  # every refusal copied nothing
    assert a.add(4, memoryview(data)[4:])
    assert bytes(a.data()) == data and a.header == "header"
    with pytest.raises(ChunkError, match="must have bytes"):
        Assembly("header", 0)


def test_a_chunked_header_is_checked_as_a_tensor_is():
    header = pb.Tensor(dtype=pb.DTYPE_FLOAT32, numel=NUM_PARAMETERS, chunked=True)
    assert chunked_nbytes(header, expected_numel=NUM_PARAMETERS, expected_dtype=torch.float32) == NBYTES
    with pytest.raises(CodecError, match="numel is 9610, expected 9611"):
        chunked_nbytes(header, expected_numel=NUM_PARAMETERS + 1)
    with pytest.raises(CodecError, match="dtype is DTYPE_FLOAT32, expected DTYPE_FLOAT64"):
        chunked_nbytes(header, expected_dtype=torch.float64)
    with pytest.raises(CodecError, match="holds 4 bytes itself"):
        chunked_nbytes(pb.Tensor(dtype=pb.DTYPE_FLOAT32, numel=1, chunked=True, data=b"\0" * 4))
    with pytest.raises(CodecError, match="not chunked"):
        chunked_nbytes(pb.Tensor(dtype=pb.DTYPE_FLOAT32, numel=1))
    with pytest.raises(CodecError, match="no elements"):
        chunked_nbytes(pb.Tensor(dtype=pb.DTYPE_FLOAT32, numel=0, chunked=True))
    with pytest.raises(CodecError, match="the tensor is chunked"):
        decode(header)  # its bytes are elsewhere


# ----- framing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chunked_messages_are_what_protobuf_reads_and_carry_the_tensor(dtype):
    t = good_gradient(3).to(dtype)
    nbytes = t.numel() * t.element_size()
    for build, parse, cls, kind in [
        (lambda c: parameters_messages(t, 7, 1.25, c), parse_server_message, pb.ServerMessage, "parameters"),
        (lambda c: gradient_messages(t, 7, 2.5, 32, c), parse_worker_message, pb.WorkerMessage, "gradient"),
    ]:
        whole, = build(0)
        reference = (pb.ServerMessage(parameters=pb.Parameters(tensor=encode(t), iteration_index=7, epoch=1.25))
                     if kind == "parameters" else
                     pb.WorkerMessage(gradient=pb.Gradient(tensor=encode(t), iteration_index=7, loss=2.5,
                                                           sample_count=32)))
        assert cls.FromString(whole) == reference
        fast = parse(whole)
        assert fast.tensor_data is not None and bytes(fast.tensor_data) == encode(t).data  # no copy: a view
        header, *chunks = build(CHUNK)
        assert len(chunks) == len(pieces(nbytes, CHUNK)) > 1
        expected_header = cls()
        expected_header.CopyFrom(reference)
        body = getattr(expected_header, kind)
        body.tensor.data = b""
        body.tensor.chunked = True
        assert cls.FromString(header) == expected_header
        assembly = Assembly(header, chunked_nbytes(getattr(cls.FromString(header), kind).tensor))
        for raw, (offset, end) in zip(chunks, pieces(nbytes, CHUNK)):
            slow = cls.FromString(raw)  # protobuf's own reading
            assert slow.WhichOneof("payload") == "chunk" and slow.chunk.offset == offset
            received = parse(raw)
            assert received.message.chunk.offset == offset and received.message.chunk.data == b""
            assert bytes(received.tensor_data) == slow.chunk.data and len(slow.chunk.data) == end - offset
            assembly.add(offset, received.tensor_data)
        got = decode(getattr(cls.FromString(header), kind).tensor, data=assembly.data())
        assert got.dtype == dtype and torch.equal(got, t)


# ----- the service -------------------------------------------------------------------------------
@pytest.fixture
def chunky(start_live_server) -> Iterator[LiveServer]:
    """The `server` fixture's run (ormo, K=2, digits/mlp), chunking at 0.01 MiB."""
    run = RunConfig(algo="ormo", workers=2, dataset="digits", model="mlp", batch_size=32, iterations=1_000_000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, log_every=1000,
                                   chunk_mib=CHUNK_MIB)
    try:
        yield live
    finally:
        stop()


@pytest.fixture
def workers(chunky: LiveServer) -> Iterator[Callable[[], RawWorker]]:
    with raw_worker_factory(chunky) as make:
        yield make


def register(worker: RawWorker, name: str, accepts_chunks: bool) -> pb.Welcome:
    worker.send(pb.WorkerMessage(register=pb.Register(name=name, accepts_chunks=accepts_chunks)))
    msg = worker.recv()
    assert msg.WhichOneof("payload") == "welcome", msg
    return msg.welcome


def receive(worker: RawWorker) -> tuple[pb.Parameters, torch.Tensor, int]:
    """The next parameters, whole or chunked: (the Parameters message, its tensor, how many chunks)."""
    msg = worker.recv()
    assert msg.WhichOneof("payload") == "parameters", msg
    params = msg.parameters
    if not params.tensor.chunked:
        return params, decode(params.tensor, expected_numel=NUM_PARAMETERS), 0
    assembly = Assembly(params, chunked_nbytes(params.tensor))
    n = 0
    while not assembly.complete:
        chunk = worker.recv()
        assert chunk.WhichOneof("payload") == "chunk", chunk
        assembly.add(chunk.chunk.offset, chunk.chunk.data)
        n += 1
    return params, decode(params.tensor, data=assembly.data()), n


def chunked(iteration_index: int, g: torch.Tensor) -> list[pb.WorkerMessage]:
    """A gradient as a chunk-reading client sends it (protobuf messages, for the RawWorker's stream)."""
    return [pb.WorkerMessage.FromString(m) for m in gradient_messages(g, iteration_index, 2.3, 32, CHUNK)]


def start(make: Callable[[], RawWorker]) -> tuple[RawWorker, RawWorker]:
    """Worker 0 reads chunks, worker 1 does not; both get w_0 (0 in four chunks, 1 whole)."""
    a, b = make(), make()
    assert register(a, "a", accepts_chunks=True).chunk_bytes == CHUNK
    assert register(b, "b", accepts_chunks=False).chunk_bytes == 0  # an older client: everything whole
    a.ready()
    b.ready()
    (pa, wa, na), (pb_, wb, nb) = receive(a), receive(b)
    assert (pa.iteration_index, na, pb_.iteration_index, nb) == (0, 4, 0, 0)
    assert torch.equal(wa, wb)
    return a, b


def test_a_chunked_gradient_changes_the_server_exactly_as_a_whole_one(chunky: LiveServer, workers):
    w0 = snapshot(chunky)["w"]
    a, b = start(workers)
    ref = reference_core(chunky, w0)
    g1, g2, g3 = good_gradient(1), good_gradient(2), good_gradient(3)
    for m in chunked(0, g1):
        a.send(m)
    params, w, n = receive(a)
    ref.push(0, g1, 0)
    assert (params.iteration_index, n) == (1, 4)
    assert torch.equal(w, ref.rule.params_to_send(ref.lr()))
    b.send(gradient_message(0, g2))  # whole, stale by one
    params, w, n = receive(b)
    ref.push(1, g2, 0)
    assert (params.iteration_index, n) == (2, 0) and torch.equal(w, ref.rule.params_to_send(ref.lr()))
    # A chunk-reading client may still send a gradient whole: the server reads either form.
    a.send(pb.WorkerMessage.FromString(gradient_messages(g3, 1, 2.3, 32)[0]))
    params, w, n = receive(a)
    ref.push(0, g3, 1)
    assert (params.iteration_index, n) == (3, 4) and torch.equal(w, ref.rule.params_to_send(ref.lr()))
    assert torch.equal(snapshot(chunky)["w"], ref.w)
    assert counters(chunky) == (3, 0, {})


def _replace(messages: list[pb.WorkerMessage], i: int, data: bytes | None = None, offset: int | None = None):
    m = pb.WorkerMessage()
    m.CopyFrom(messages[i])
    if data is not None:
        m.chunk.data = data
    if offset is not None:
        m.chunk.offset = offset
    return [*messages[:i], m, *messages[i + 1:]]


def _nan_gradient() -> torch.Tensor:
    g = good_gradient(5)
    g[-1] = float("nan")  # in the last chunk
    return g


G = good_gradient(4)
GOOD = chunked(0, G)  # header + four chunks
WRONG_NUMEL = [pb.WorkerMessage.FromString(m) for m in gradient_messages(torch.zeros(NUM_PARAMETERS + 1), 0, 2.3,
                                                                           32, CHUNK)]
HOLDING_DATA = pb.WorkerMessage()
HOLDING_DATA.CopyFrom(GOOD[0])
HOLDING_DATA.gradient.tensor.data = b"\0" * NBYTES
# (id, what worker 0 sends while it holds index 0, the error's words, the rejection's reason)
BAD_SEQUENCES = [
    ("a chunk with no header", GOOD[1:], "expected a chunked Gradient before its chunks on the Train stream, got chunk",
     "malformed"),
    ("out of order", [GOOD[0], GOOD[2], GOOD[1], *GOOD[3:]],
     f"bad gradient chunk: chunk at byte {CHUNK}, expected the one at byte 0 of {NBYTES}", "malformed"),
    ("a chunk repeated", [*GOOD[:3], GOOD[2], *GOOD[3:]],
     f"chunk at byte {CHUNK}, expected the one at byte {2 * CHUNK}", "malformed"),
    ("an empty chunk", _replace(GOOD, 2, data=b""), f"empty chunk at byte {CHUNK}", "malformed"),
    ("past the end", _replace(GOOD, 4, data=GOOD[4].chunk.data + b"\0\0\0\0"),
     f"runs past the tensor's {NBYTES} bytes", "malformed"),
    ("another gradient amid the chunks", [*GOOD[:2], gradient_message(0, G)],
     f"expected the next chunk of the gradient (byte {CHUNK} of {NBYTES}) on the Train stream, got gradient",
     "malformed"),
    ("a second header amid the chunks", [*GOOD[:2], GOOD[0]], "got gradient", "malformed"),
    ("a header of the wrong size", WRONG_NUMEL[:1], f"tensor numel is {NUM_PARAMETERS + 1}, expected "
     f"{NUM_PARAMETERS}", "tensor"),
    ("a header holding the bytes", [HOLDING_DATA], "holds bytes itself", "tensor"),
    ("a NaN in the last chunk", chunked(0, _nan_gradient()), "is not finite", "nonfinite"),
    # The negotiated size: a million 1-byte pieces would cost the server ~115 us each; larger ones than agreed
    # are not taken either. Refused at the first such piece.
    ("1-byte chunks", [GOOD[0], *_replace(GOOD, 1, data=GOOD[1].chunk.data[:1])[1:2]],
     f"chunk of 1 bytes at byte 0 of {NBYTES}: the chunk size is {CHUNK} bytes", "malformed"),
    ("a chunk larger than the chunk size", [GOOD[0], *_replace(GOOD, 1, data=GOOD[1].chunk.data * 2)[1:2]],
     f"chunk of {2 * CHUNK} bytes at byte 0 of {NBYTES}: the chunk size is {CHUNK} bytes", "malformed"),
    ("a short chunk before the last", [*GOOD[:2], *_replace(GOOD, 2, data=GOOD[2].chunk.data[:-1])[2:3]],
     f"chunk of {CHUNK - 1} bytes at byte {CHUNK} of {NBYTES}: the chunk size is {CHUNK} bytes", "malformed"),
]


@pytest.mark.parametrize("sequence,message,reason", [b[1:] for b in BAD_SEQUENCES], ids=[b[0] for b in BAD_SEQUENCES])
def test_a_bad_chunk_sequence_is_refused_and_changes_nothing(chunky: LiveServer, workers, sequence, message, reason):
    a, b = start(workers)
    before = snapshot(chunky)
    for m in sequence:
        a.send(m)
    assert_aborted(a, grpc.StatusCode.INVALID_ARGUMENT, message)
    assert_same_state(snapshot(chunky), before)
    assert counters(chunky) == (0, 1, {reason: 1})
    # The run goes on: the other worker's gradient is applied, and worker 0 comes back with its id.
    b.send(gradient_message(0, G))
    assert receive(b)[0].iteration_index == 1
    again = workers()
    again.send(pb.WorkerMessage(register=pb.Register(name="a", requested_worker_id=0, accepts_chunks=True)))
    assert again.recv().welcome.worker_id == 0
    again.ready()
    params, _, n = receive(again)
    assert (params.iteration_index, n) == (1, 4)
    for m in chunked(1, G):
        again.send(m)
    assert receive(again)[0].iteration_index == 2


# ----- real clients ---------------------------------------------------------------------------------
def _final_parameters_of_a_k1_run(start_live_server, chunk_mib: float) -> tuple[torch.Tensor, int]:
    """A K=1 run of 60 iterations trained by ps-worker's client: one worker makes it deterministic."""
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=60)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=30.0, chunk_mib=chunk_mib)  # read it after
    try:
        result: dict = {}
        worker = Worker(WorkerOptions(server=live.target, server_timeout=20.0))

        def train() -> None:
            result["result"] = asyncio.run(asyncio.wait_for(worker.run(), 60))

        thread = threading.Thread(target=train)
        thread.start()
        thread.join(90)
        assert not thread.is_alive() and result["result"].stop_reason == "STOP_REASON_DONE"
        assert worker._sender.chunk_bytes == round(chunk_mib * MIB)
        status = live.stub().GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT)
        return live.on_loop(lambda: live.service.core.current_params().clone()), status.gradients_applied
    finally:
        stop()


def test_ps_workers_training_in_chunks_reach_the_same_parameters_bit_for_bit(start_live_server):
    whole, applied_whole = _final_parameters_of_a_k1_run(start_live_server, 4.0)  # 38 kB: below 4 MiB, whole
    pieces_, applied_chunked = _final_parameters_of_a_k1_run(start_live_server, CHUNK_MIB)
    assert applied_whole == applied_chunked == 60
    assert torch.equal(whole, pieces_)


def test_a_buffer_pool_hands_back_buffers_of_the_size_asked_and_keeps_few():
    pool = BufferPool(max_bytes=100)
    a = pool.take(40)
    assert a.dtype == np.uint8 and a.shape == (40,)
    pool.give(a)
    assert pool.take(40) is a  # used again
    assert pool.take(40) is not a  # (it was taken)
    b, c, d = pool.take(60), pool.take(40), pool.take(40)
    pool.give(b)
    pool.give(c)
    pool.give(d)  # over max_bytes: dropped
    assert pool.take(60) is b and pool.take(40) is c and pool.take(40) is not d
    assembly = Assembly("header", 60, b)
    assert assembly.buffer is b
    with pytest.raises(ValueError, match="must be 40 uint8"):
        Assembly("header", 40, b)


BIG = 8_000_000  # 32 MB of parameters: more than HTTP/2's flow-control windows let through unread


def big_flat(num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """A model that is one flat vector of BIG parameters (its output is never computed here)."""
    module = torch.nn.Module()
    module.flat = torch.nn.Parameter(torch.zeros(BIG))
    return module


def test_a_worker_hanging_up_while_its_answer_is_written_is_no_error(start_live_server, caplog):
    """A worker that does not read its answer (32 MB: the server's writes stop at HTTP/2's flow-control window)
    and then hangs up: the server logs no error, its gradient counts as applied, and the slot is free for the
    next worker."""
    run = RunConfig(algo="asgd", workers=1, dataset="synthetic", model="tests.test_chunks:big_flat", batch_size=32,
                    iterations=1_000_000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0)  # 4 MiB chunks
    try:
        for i in range(2):
            w = RawWorker(live.stub())
            assert register(w, f"w{i}", accepts_chunks=True).config.num_parameters == BIG
            w.ready()
            params = w.recv().parameters  # w_0, chunked, read to the end
            assert params.tensor.chunked
            for _ in range(-(-4 * BIG // (4 << 20))):
                assert w.recv().WhichOneof("payload") == "chunk"
            w.send(pb.WorkerMessage(gradient=pb.Gradient(tensor=encode(torch.full((BIG,), 1e-3)),
                                                         iteration_index=params.iteration_index)))
            deadline = time.monotonic() + 20
            while counters(live)[0] < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert counters(live)[0] == i + 1
            time.sleep(0.3)  # the answer is being written, and stalls: nobody reads it
            w.close()
            while live.on_loop(lambda: 0 in live.service.connections) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not live.on_loop(lambda: 0 in live.service.connections)
        assert counters(live)[:2] == (2, 0)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]
    finally:
        stop()


def test_chunks_from_a_client_that_did_not_ask_for_them_are_refused(chunky: LiveServer, workers):
    """The Welcome says how a client sends: one that did not set accepts_chunks was told chunk_bytes 0 and
    sends every tensor whole."""
    a, b = start(workers)
    before = snapshot(chunky)
    b.send(GOOD[0])
    assert_aborted(b, grpc.StatusCode.INVALID_ARGUMENT, "chunked tensors were not negotiated on this stream (the "
                   "client's Register did not set accepts_chunks): send it whole")
    assert_same_state(snapshot(chunky), before)
    assert counters(chunky) == (0, 1, {"tensor": 1})
    for m in GOOD:  # the other, which asked, may
        a.send(m)
    assert receive(a)[0].iteration_index == 1


@pytest.mark.parametrize("chunk_mib,message", [
    (0, "chunked tensors were not negotiated on this stream (the server sends and reads every tensor whole "
        "(--chunk-mib 0)): send it whole"),
    (1, f"a tensor of {NBYTES} bytes travels whole (the chunk size is {MIB} bytes)"),
])
def test_chunks_are_refused_where_the_welcome_said_whole(start_live_server, chunk_mib, message):
    """`--chunk-mib 0` switches the chunk path off for everyone; a tensor no larger than the chunk size is
    never chunked."""
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=1000)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, chunk_mib=chunk_mib)
    try:
        with raw_worker_factory(live) as make:
            a = make()
            assert register(a, "a", accepts_chunks=True).chunk_bytes == round(chunk_mib * MIB)
            a.ready()
            receive(a)
            before = snapshot(live)
            for m in GOOD:
                a.send(m)
            assert_aborted(a, grpc.StatusCode.INVALID_ARGUMENT, message)
            assert_same_state(snapshot(live), before)
            assert counters(live) == (0, 1, {"tensor": 1})
    finally:
        stop()
