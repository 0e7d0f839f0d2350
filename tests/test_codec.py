"""Tensor codec: exact bytes, strict validation, and whole 100M-parameter tensors through real gRPC."""

from __future__ import annotations

import asyncio
import gc
import resource
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ormo_ps.common import grpc_options
from ormo_ps.common.codec import CodecError, check_finite, decode, encode
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PB_DTYPES = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
}
# Same-width integer views, to compare bit patterns (NaN payloads, -0.0) exactly.
INT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEWS[a.dtype]), b.view(INT_VIEWS[b.dtype]))


# --- exact wire bytes -------------------------------------------------------------------------------

# [1.0, -2.5, 0.0]: little-endian IEEE bytes written out by hand (bfloat16 = top half of float32).
EXPECTED_BYTES = {
    torch.float32: struct.pack("<3f", 1.0, -2.5, 0.0),
    torch.float64: struct.pack("<3d", 1.0, -2.5, 0.0),
    torch.float16: struct.pack("<3e", 1.0, -2.5, 0.0),
    torch.bfloat16: bytes([0x80, 0x3F, 0x20, 0xC0, 0x00, 0x00]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_writes_exact_little_endian_bytes(dtype: torch.dtype) -> None:
    msg = encode(torch.tensor([1.0, -2.5, 0.0], dtype=dtype))
    assert msg.dtype == PB_DTYPES[dtype]
    assert msg.numel == 3
    assert msg.data == EXPECTED_BYTES[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_exact_and_flat(dtype: torch.dtype) -> None:
    t = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    msg = encode(t)
    assert len(msg.data) == 20 * ITEMSIZE[dtype]
    out = decode(msg, expected_numel=20, expected_dtype=dtype)
    assert out.shape == (20,)
    assert out.dtype == dtype
    assert _same_bits(out, t.reshape(-1))


def test_round_trip_survives_a_real_protobuf_serialization() -> None:
    t = torch.randn(1000, dtype=torch.float32)
    wire = pb.Gradient(tensor=encode(t), iteration_index=7).SerializeToString()
    back = pb.Gradient.FromString(wire)
    assert back.iteration_index == 7
    assert torch.equal(decode(back.tensor), t)


def test_encode_flattens_non_contiguous_tensors_in_logical_order() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # [[0,3],[1,4],[2,5]], not contiguous
    assert torch.equal(decode(encode(t)), torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0, 5.0]))


def test_encode_detaches_parameters_that_require_grad() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(decode(encode(p)), torch.ones(3))


def test_encode_numpy_arrays_including_big_endian() -> None:
    expected = struct.pack("<3f", 1.0, -2.5, 0.0)
    assert encode(np.array([1.0, -2.5, 0.0], dtype=np.float32)).data == expected
    assert encode(np.array([1.0, -2.5, 0.0], dtype=">f4")).data == expected
    assert encode(np.array([[1.0], [2.0]], dtype=np.float64)).numel == 2


def test_encode_casts_when_asked() -> None:
    msg = encode(torch.tensor([1.0, -2.5, 0.0]), dtype=torch.bfloat16)
    assert (msg.dtype, msg.data) == (pb.DTYPE_BFLOAT16, EXPECTED_BYTES[torch.bfloat16])
    assert encode(np.array([1, 2], dtype=np.int64), dtype=torch.float32).data == struct.pack("<2f", 1, 2)


def test_encode_fills_a_field_of_a_message_in_place() -> None:
    msg = pb.WorkerMessage()
    returned = encode(torch.tensor([1.0, -2.5, 0.0]), out=msg.gradient.tensor)
    assert returned is msg.gradient.tensor
    assert msg.WhichOneof("payload") == "gradient"
    assert (msg.gradient.tensor.numel, msg.gradient.tensor.data) == (3, EXPECTED_BYTES[torch.float32])


def test_empty_tensor_round_trips() -> None:
    out = decode(encode(torch.empty(0)), expected_numel=0)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "value",
    [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.complex64), np.zeros(2, dtype=np.int16)],
    ids=["int64", "complex64", "numpy-int16"],
)
def test_encode_rejects_dtypes_outside_the_whitelist(value) -> None:
    with pytest.raises(CodecError, match=r"dtype .* is not supported; allowed: DTYPE_FLOAT32"):
        encode(value)


def test_encode_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray, got list"):
        encode([1.0, 2.0])  # type: ignore[arg-type]


# --- decode validation ------------------------------------------------------------------------------


def _msg(dtype: int = pb.DTYPE_FLOAT32, numel: int = 2, data: bytes = b"\0" * 8) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, numel=numel, data=data)


def test_decode_rejects_wrong_byte_length() -> None:
    with pytest.raises(CodecError) as err:
        decode(_msg(numel=3))
    assert str(err.value) == "tensor data is 8 bytes, expected numel 3 x 4 bytes (DTYPE_FLOAT32) = 12 bytes"


def test_decode_rejects_unexpected_numel() -> None:
    with pytest.raises(CodecError) as err:
        decode(_msg(), expected_numel=5)
    assert str(err.value) == "tensor numel is 2, expected 5"


@pytest.mark.parametrize("expected", [torch.float64, pb.DTYPE_FLOAT64, np.float64], ids=["torch", "pb", "numpy"])
def test_decode_rejects_unexpected_dtype(expected) -> None:
    with pytest.raises(CodecError) as err:
        decode(_msg(), expected_dtype=expected)
    assert str(err.value) == "tensor dtype is DTYPE_FLOAT32, expected DTYPE_FLOAT64"


def test_decode_rejects_unspecified_dtype() -> None:
    with pytest.raises(CodecError, match=r"^tensor dtype is DTYPE_UNSPECIFIED; expected one of: DTYPE_FLOAT32"):
        decode(_msg(dtype=pb.DTYPE_UNSPECIFIED))


def test_decode_rejects_unknown_enum_values() -> None:
    # proto3 enums are open: a newer peer's value 99 parses fine and must still be refused.
    msg = pb.Tensor.FromString(_msg(dtype=99).SerializeToString())
    assert msg.dtype == 99
    with pytest.raises(CodecError, match=r"^dtype 99 \(unknown\) is not supported; allowed:"):
        decode(msg)


def test_decode_rejects_other_messages() -> None:
    with pytest.raises(TypeError, match="ps.v1.Tensor message, got Parameters"):
        decode(pb.Parameters())  # type: ignore[arg-type]


def test_decoded_tensor_is_writable_and_independent_of_the_message() -> None:
    msg = encode(torch.ones(4))
    out = decode(msg)
    out.add_(1.0)  # in-place on the decoded tensor: must not touch the message
    assert torch.equal(decode(msg), torch.ones(4))
    assert torch.equal(out, torch.full((4,), 2.0))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_leaks_no_warning(dtype: torch.dtype, copy: bool) -> None:
    t = torch.randn(8).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(encode(t), copy=copy)
    assert _same_bits(out, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_to_cuda() -> None:
    t = torch.randn(100)
    out = decode(encode(t), device="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), t)
    assert torch.equal(decode(encode(out)), t)  # and back from the GPU


def test_wire_dtypes_and_their_sizes() -> None:
    assert encode(torch.zeros(3, dtype=torch.bfloat16)).dtype == pb.DTYPE_BFLOAT16
    assert decode(encode(torch.zeros(3, dtype=torch.float16))).dtype == torch.float16
    assert [len(encode(torch.zeros(1, dtype=d)).data) for d in DTYPES] == [4, 2, 2, 8]
    with pytest.raises(CodecError):
        encode(torch.zeros(1, dtype=torch.int8))


# --- check_finite -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_check_finite_accepts_finite_values(dtype: torch.dtype) -> None:
    check_finite(torch.tensor([0.0, -1.0, 1e4], dtype=dtype))
    check_finite(torch.empty(0, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_check_finite_names_nan_and_inf(dtype: torch.dtype) -> None:
    t = torch.tensor([1.0, float("inf"), float("nan"), float("-inf"), float("nan")], dtype=dtype)
    with pytest.raises(CodecError) as err:
        check_finite(t)
    assert str(err.value) == "tensor is not finite: 2 NaN and 2 Inf of 5 values (first at index 1: inf)"


def test_check_finite_accepts_finite_values_whose_sum_overflows() -> None:
    check_finite(torch.full((4,), 3e38, dtype=torch.float32))
    check_finite(torch.full((4,), 1.7e308, dtype=torch.float64))
    check_finite(torch.full((4,), 65000.0, dtype=torch.float16))


def test_check_finite_on_numpy_and_2d() -> None:
    with pytest.raises(CodecError, match=r"1 NaN and 0 Inf of 4 values \(first at index 3: nan\)"):
        check_finite(np.array([[0.0, 1.0], [2.0, np.nan]]))


@pytest.mark.filterwarnings("error")
def test_check_finite_on_read_only_numpy_arrays() -> None:
    array = np.frombuffer(struct.pack("<2f", 1.0, float("inf")), dtype="<f4")
    assert not array.flags.writeable
    with pytest.raises(CodecError, match="0 NaN and 1 Inf"):
        check_finite(array)


def test_check_finite_after_decode() -> None:
    with pytest.raises(CodecError, match="1 NaN"):
        check_finite(decode(encode(torch.tensor([0.0, float("nan")]))))


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_any_bit_pattern_round_trips_exactly(dtype: torch.dtype, data: st.DataObject) -> None:
    # Random raw bytes cover every value, NaN payloads, subnormals, -0.0 and infinities alike.
    n = data.draw(st.integers(0, 64))
    raw = data.draw(st.binary(min_size=n * ITEMSIZE[dtype], max_size=n * ITEMSIZE[dtype]))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
    msg = encode(t)
    assert msg.data == raw
    assert _same_bits(decode(msg, expected_numel=n, expected_dtype=dtype), t)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    values=st.lists(st.floats(allow_nan=False, width=32), max_size=50),
)
def test_random_float_lists_round_trip(dtype: torch.dtype, values: list[float]) -> None:
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert torch.equal(decode(pb.Tensor.FromString(encode(t).SerializeToString())), t)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.one_of(st.integers(0, 6), st.integers(0, 2**31 - 1)),
    numel=st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1)),
    data=st.binary(max_size=64),
    expected_numel=st.none() | st.integers(0, 40),
    expected_dtype=st.none() | st.sampled_from(DTYPES),
)
def test_arbitrary_messages_decode_or_raise_codec_error(dtype, numel, data, expected_numel, expected_dtype) -> None:
    msg = pb.Tensor.FromString(pb.Tensor(dtype=dtype, numel=numel, data=data).SerializeToString())
    try:
        out = decode(msg, expected_numel=expected_numel, expected_dtype=expected_dtype)
    except CodecError:
        return
    assert out.ndim == 1 and out.numel() == numel
    assert out.numel() * out.element_size() == len(data)
    assert encode(out).dtype == dtype


# --- through real gRPC ------------------------------------------------------------------------------


class _EchoServicer(pb_grpc.ParameterServerServicer):
    """Answers every Gradient on the Train stream with Parameters holding the same tensor, index + 1."""

    async def Train(self, request_iterator, context):
        async for message in request_iterator:
            reply = pb.ServerMessage()
            reply.parameters.tensor.CopyFrom(message.gradient.tensor)
            reply.parameters.iteration_index = message.gradient.iteration_index + 1
            del message  # keep one copy of a 400 MB payload alive, not two
            yield reply


@pytest.fixture
def echo_server() -> Iterator[Callable[[list | None], int]]:
    """Starts grpc.aio echo servers on 127.0.0.1:0 (on a loop in a background thread); yields a starter
    taking the server options and returning the bound port.

    Clients use the sync API: a grpc.aio client on a second event loop in the same process moved the
    400 MB payload ~20x slower (128 s against 6 s) than a sync client or one shared loop.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[grpc.aio.Server] = []

    async def start(options: list | None) -> int:
        server = grpc.aio.server(options=options)
        pb_grpc.add_ParameterServerServicer_to_server(_EchoServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return port

    def starter(options: list | None) -> int:
        return asyncio.run_coroutine_threadsafe(start(options), loop).result(timeout=30)

    try:
        yield starter
    finally:
        for server in servers:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _echo(port: int, t: torch.Tensor, options: list | None) -> pb.Parameters:
    """Sends t as one Gradient over a Train stream and returns the first reply's Parameters."""

    def requests() -> Iterator[pb.WorkerMessage]:
        # Built lazily so that no reference outlives its serialization (400 MB each).
        request = pb.WorkerMessage()
        encode(t, out=request.gradient.tensor)
        request.gradient.iteration_index = 41
        yield request

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        replies = pb_grpc.ParameterServerStub(channel).Train(requests())
        return next(replies).parameters


def test_message_options_raise_both_limits() -> None:
    assert dict(grpc_options.GRPC_MESSAGE_OPTIONS) == {
        "grpc.max_send_message_length": grpc_options.MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": grpc_options.MAX_MESSAGE_BYTES,
    }
    assert grpc_options.MAX_MESSAGE_BYTES >= 100_000_000 * 8 + 1024  # 100M float64 parameters fit
    assert grpc_options.grpc_message_options(-1)[0] == ("grpc.max_send_message_length", -1)
    with pytest.raises(ValueError, match="max_bytes"):
        grpc_options.grpc_message_options(2**31)


def test_small_tensor_round_trips_through_grpc(echo_server) -> None:
    t = torch.randn(1000)
    params = _echo(echo_server(grpc_options.GRPC_MESSAGE_OPTIONS), t, grpc_options.GRPC_MESSAGE_OPTIONS)
    assert params.iteration_index == 42
    assert torch.equal(decode(params.tensor, expected_numel=1000), t)


# 8 MB is over gRPC's 4 MiB default receive limit: without the options one end or the other refuses it.
@pytest.mark.parametrize(
    ("server_options", "client_options"),
    [(None, None), (None, grpc_options.GRPC_MESSAGE_OPTIONS), (grpc_options.GRPC_MESSAGE_OPTIONS, None)],
    ids=["neither", "client-only", "server-only"],
)
def test_grpc_refuses_large_tensors_without_the_options_on_both_ends(
    echo_server, server_options, client_options
) -> None:
    port = echo_server(server_options)
    with pytest.raises(grpc.RpcError) as err:
        _echo(port, torch.zeros(2_000_000), client_options)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak_rss() -> int:
    """Resets the peak RSS to the current RSS where Linux allows it; returns the (new) peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # then the peak only over-states the baseline, making the bound below looser
    return _peak_rss()


@pytest.mark.slow
def test_100m_parameters_round_trip_through_grpc(echo_server) -> None:
    numel = 100_000_000  # 400 MB of float32, both directions on one Train stream
    gc.collect()
    rss_before = _reset_peak_rss()
    port = echo_server(grpc_options.GRPC_MESSAGE_OPTIONS)
    t = torch.arange(numel, dtype=torch.float32)  # not all zeros: a lost or misplaced chunk shows
    start = time.perf_counter()
    params = _echo(port, t, grpc_options.GRPC_MESSAGE_OPTIONS)
    out = decode(params.tensor, expected_numel=numel, expected_dtype=torch.float32, copy=False)
    elapsed = time.perf_counter() - start
    del params
    assert torch.equal(out, t)
    peak_growth = _peak_rss() - rss_before
    print(f"100M float32 echo: {elapsed:.2f} s, peak RSS growth {peak_growth / 2**30:.2f} GiB")
    assert elapsed < 30
    assert peak_growth < 3 * 2**30
