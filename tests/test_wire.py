"""ormo_ps.common.wire: the hand-framed Train messages read exactly as protobuf's own, for any input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ormo_ps.common.codec import decode, encode
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.wire import Received, parse_worker_message, serialize_parameters, serialize_message
from ormo_ps.server.servicer import SERVICE_NAME, add_to_server


def reference_parameters(t: torch.Tensor, ite: int, epoch: float) -> pb.ServerMessage:
    return pb.ServerMessage(parameters=pb.Parameters(tensor=encode(t), iteration_index=ite, epoch=epoch))


def rejoined(r: Received) -> pb.WorkerMessage:
    """The message with the tensor bytes put back where protobuf would have left them."""
    m = pb.WorkerMessage()
    m.CopyFrom(r.message)
    if r.tensor_data is not None:
        assert m.gradient.tensor.data == b""
        m.gradient.tensor.data = bytes(r.tensor_data)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 31, 40_000, 269_722])  # lengths with 1-, 2- and 3-byte varints
def test_serialized_parameters_parse_to_the_message_encode_builds(dtype: torch.dtype, numel: int) -> None:
    t = torch.randn(numel).to(dtype)
    got = pb.ServerMessage.FromString(serialize_parameters(t, 12345, 3.25))
    assert got == reference_parameters(t, 12345, 3.25)
    assert torch.equal(decode(got.parameters.tensor), t)


def test_serialized_parameters_are_a_snapshot() -> None:
    t = torch.arange(10, dtype=torch.float32)
    raw = serialize_parameters(t, 0, 0.0)
    t += 1  # the live tensor moves on; the queued message must not
    assert torch.equal(decode(pb.ServerMessage.FromString(raw).parameters.tensor), torch.arange(10.0))


def test_server_message_serializer_passes_bytes_and_serializes_messages() -> None:
    stop = pb.ServerMessage(stop=pb.Stop(reason=pb.STOP_REASON_DONE, detail="x"))
    assert serialize_message(stop) == stop.SerializeToString()
    raw = serialize_parameters(torch.ones(3), 1, 0.0)
    assert serialize_message(raw) is raw


def test_a_plain_gradient_is_split_without_copying_its_tensor() -> None:
    g = torch.randn(269_722)
    m = pb.WorkerMessage(gradient=pb.Gradient(tensor=encode(g), iteration_index=7, loss=0.5, sample_count=128))
    raw = m.SerializeToString()
    r = parse_worker_message(raw)
    assert r.tensor_data is not None and r.tensor_data.obj is raw  # a view of the received buffer
    assert r.message.gradient.iteration_index == 7 and r.message.gradient.sample_count == 128
    assert rejoined(r) == m
    got = decode(r.message.gradient.tensor, expected_numel=g.numel(), copy=False, data=r.tensor_data)
    assert torch.equal(got, g)


def test_decode_refuses_tensor_bytes_given_twice() -> None:
    from ormo_ps.common.codec import CodecError

    t = encode(torch.ones(2))
    with pytest.raises(CodecError, match="twice"):
        decode(t, data=t.data)


@pytest.mark.parametrize("message", [
    pb.WorkerMessage(register=pb.Register(name="w", slowdown=2.0)),
    pb.WorkerMessage(ready=pb.Ready()),
    pb.WorkerMessage(),
    pb.WorkerMessage(gradient=pb.Gradient(iteration_index=3)),  # no tensor at all
])
def test_other_messages_parse_as_protobuf_does(message: pb.WorkerMessage) -> None:
    r = parse_worker_message(message.SerializeToString())
    assert r.tensor_data is None and r.message == message


def _messages() -> st.SearchStrategy[bytes]:
    tensors = st.builds(lambda d, n, data: pb.Tensor(dtype=d, numel=n, data=data),
                        st.integers(0, 4), st.integers(0, 2**20), st.binary(max_size=64))
    gradients = st.builds(lambda t, i, loss: pb.WorkerMessage(gradient=pb.Gradient(tensor=t, iteration_index=i,
                                                                                      loss=loss)),
                          tensors, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True))
    others = st.sampled_from([pb.WorkerMessage(register=pb.Register(name="x")), pb.WorkerMessage(ready=pb.Ready())])
    one = st.one_of(gradients, others).map(lambda m: m.SerializeToString())
    # Concatenations merge (repeated fields, later oneof members win); random bytes and cut messages are
    # malformed more often than not.
    return st.one_of(one, st.lists(one, min_size=2, max_size=3).map(b"".join), st.binary(max_size=80),
                     one.flatmap(lambda b: st.integers(0, len(b)).map(lambda k: b[:k])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_any_bytes_parse_exactly_as_from_string(raw: bytes) -> None:
    try:
        want = pb.WorkerMessage.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_worker_message(raw)
        return
    assert rejoined(parse_worker_message(raw)) == want


def test_the_server_registers_every_rpc_of_the_proto() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.names: set[str] = set()

        def add_generic_rpc_handlers(self, handlers) -> None:  # noqa: ANN001
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            assert service == SERVICE_NAME
            self.names |= set(handlers)
            for h in handlers.values():
                assert isinstance(h, grpc.RpcMethodHandler)

    rec = Recorder()
    add_to_server(type("S", (), {"Train": None, "GetParameters": None, "GetStatus": None})(), rec)
    proto = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert proto.full_name == SERVICE_NAME
    assert rec.names == set(proto.methods_by_name)


def test_numpy_input_is_serialized_like_torch() -> None:
    a = np.linspace(-1, 1, 1000, dtype=np.float32)
    assert pb.ServerMessage.FromString(serialize_parameters(a, 2, 1.0)) == reference_parameters(
        torch.from_numpy(a.copy()), 2, 1.0)
