"""`--wire-dtype bfloat16|float16` (#25): gradients and parameters cross the Train stream in half the bytes,
rounded to nearest even on the way out; the server keeps and applies float32 exactly as it would with the
widened gradient; a float16 overflow is a clear error, never an Inf applied."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from ormo_ps.common.codec import decode, encode
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.tensor_header import CodecError
from ormo_ps.common.transport import Receiver, Sender
from ormo_ps.common.wire import parse_server_message, parse_worker_message
from ormo_ps.common.wire_dtype import from_pb, round_trip, to_wire
from ormo_ps.server.config import RunConfig
from ormo_ps.sim.simulator import Simulator
from tests.conftest import raw_worker_factory
from tests.test_service import NUM_PARAMETERS, assert_aborted, reference_core, snapshot, status

# Known values and what each wire dtype makes of them (round to nearest, ties to even).
ONE = 1.0
KNOWN = torch.tensor([ONE, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -65504.0, 1e-8, 3.0e38])
BF16 = [ONE, ONE, 1 + 2**-6, ONE, ONE, -65536.0, 1e-8, 3.0e38]  # 8 significant bits
FP16 = [ONE, 1 + 2**-8, 1 + 3 * 2**-8, ONE, 1 + 2**-9, -65504.0, 0.0, float("inf")]  # 11 bits, up to 65504


def test_rounding_to_nearest_even_of_known_values():
    got = round_trip(KNOWN, torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(BF16), rtol=2**-8, atol=0)  # 1e-8 and 3e38 to 8 bits
    assert got[:6].tolist() == BF16[:6]  # the ties exactly
    assert round_trip(KNOWN[:-1], torch.float16).tolist()[:6] == FP16[:6]
    assert round_trip(KNOWN[:-1], torch.float16)[6] == pytest.approx(1e-8, abs=6e-8)  # a float16 subnormal
    assert torch.equal(round_trip(KNOWN, torch.float32), KNOWN)


def test_a_float16_overflow_is_an_error_naming_the_way_out():
    with pytest.raises(CodecError, match=r"the parameters would overflow the float16 wire: the largest magnitude, "
                                         r"3e\+38, is above 65504; --wire-dtype bfloat16 keeps float32's range"):
        to_wire(KNOWN, torch.float16, "the parameters")
    assert torch.isinf(to_wire(KNOWN, torch.float16, check=False)[-1])  # unchecked: the Inf the server refuses
    assert to_wire(torch.tensor([65519.0]), torch.float16).item() == 65504.0  # rounds down: no overflow
    with pytest.raises(CodecError, match="would overflow the float16 wire"):
        Sender(wire_dtype=torch.float16).parameters(KNOWN, 1, 0.0)


@pytest.mark.parametrize("dtype,pb_dtype", [(torch.bfloat16, pb.DTYPE_BFLOAT16), (torch.float16, pb.DTYPE_FLOAT16)])
@pytest.mark.parametrize("chunk_bytes", [0, 6])
def test_both_sides_exchange_the_rounded_values_exactly(dtype, pb_dtype, chunk_bytes):
    """What a Sender writes and a Receiver (the other side) takes back: the wire dtype's 2 bytes an element, the
    rounded values, widened exactly by the decoder; whole or in chunks."""
    values = KNOWN[:-1]
    messages = Sender(chunk_bytes, wire_dtype=dtype).parameters(values, 3, 0.5)
    receiver = Receiver(chunk_bytes=chunk_bytes, announcement="Parameters")
    for raw in messages:
        whole = receiver.take(parse_server_message(raw))
    tensor = whole.message.parameters.tensor
    assert (tensor.dtype, tensor.numel) == (pb_dtype, values.numel())
    assert len(messages) == (1 if chunk_bytes == 0 else -(-2 * values.numel() // chunk_bytes) + 1)
    got = decode(tensor, expected_dtype=dtype, data=whole.tensor_data)
    assert got.dtype == dtype and torch.equal(got.float(), round_trip(values, dtype))
    gradient = Sender(0, wire_dtype=dtype).gradient(values, 7, 1.0)
    assert parse_worker_message(gradient[0]).message.gradient.tensor.dtype == pb_dtype
    # The initial parameters a client brings are float32 whatever the wire: they become the master copy.
    ready = Sender(0, wire_dtype=dtype).ready(pb.Ready(), values)
    assert pb.WorkerMessage.FromString(ready[0]).ready.parameters.dtype == pb.DTYPE_FLOAT32
    assert from_pb(pb_dtype) == dtype and from_pb(pb.DTYPE_UNSPECIFIED) == torch.float32


@pytest.fixture
def bf16_server(start_live_server):
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=10**6,
                    wire_dtype="bfloat16")
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, log_every=1000)
    try:
        yield live
    finally:
        stop()


def _gradient(index: int, g: torch.Tensor) -> pb.WorkerMessage:
    msg = pb.WorkerMessage(gradient=pb.Gradient(iteration_index=index, loss=1.0))
    encode(g, out=msg.gradient.tensor)
    return msg


def test_a_bfloat16_run_over_the_wire_is_the_float32_rule_on_the_rounded_values(bf16_server):
    live = bf16_server
    w0 = snapshot(live)["w"]
    with raw_worker_factory(live) as make:
        worker = make()
        assert worker.register().config.wire_dtype == pb.DTYPE_BFLOAT16
        worker.ready()
        first = worker.parameters()
        assert first.tensor.dtype == pb.DTYPE_BFLOAT16 and len(first.tensor.data) == 2 * NUM_PARAMETERS
        assert torch.equal(decode(first.tensor).float(), round_trip(w0, torch.bfloat16))
        g = torch.randn(NUM_PARAMETERS, generator=torch.Generator().manual_seed(3)) * 0.01
        worker.send(_gradient(0, g.to(torch.bfloat16)))
        answer = worker.parameters()
        ref = reference_core(live, w0)  # the server's float32 rule on the widened gradient, exactly
        ref.push(0, g.to(torch.bfloat16).float(), 0)
        assert torch.equal(snapshot(live)["w"], ref.w)
        assert torch.equal(decode(answer.tensor).float(), round_trip(ref.rule.params_to_send(ref.lr()),
                                                                       torch.bfloat16))
        # A float32 gradient on a bfloat16 run is refused and changes nothing.
        before = snapshot(live)
        worker.send(_gradient(1, g))
        assert_aborted(worker, grpc.StatusCode.INVALID_ARGUMENT,
                       "tensor dtype is DTYPE_FLOAT32, expected DTYPE_BFLOAT16")
        assert torch.equal(snapshot(live)["w"], before["w"])
    assert status(live).gradients_applied == 1


def test_an_overflowing_float16_gradient_is_refused_with_the_reason(start_live_server):
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=10**6,
                    wire_dtype="float16")
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0)
    try:
        with raw_worker_factory(live) as make:
            worker = make()
            worker.register()
            worker.ready()
            worker.parameters()
            before = snapshot(live)
            g = torch.full((NUM_PARAMETERS,), 1e-3)
            g[7] = 70000.0  # a worker's Sender sends it as the Inf it becomes (check=False)
            worker.send(_gradient(0, to_wire(g, torch.float16, check=False)))
            assert_aborted(worker, grpc.StatusCode.INVALID_ARGUMENT, "on the float16 wire a magnitude above 65504 "
                                                                     "arrives as Inf; --wire-dtype bfloat16")
            assert torch.equal(snapshot(live)["w"], before["w"])
    finally:
        stop()


def test_the_simulator_says_why_a_float16_run_stopped(tmp_path):
    """The same refusal in the simulator: the run ends there with the reason (a simulated run has one worker's
    arithmetic for all, so a gradient that overflows is every worker's)."""
    run = RunConfig(algo="asgd", workers=2, dataset="digits", model="mlp", batch_size=32, lr=1e5, iterations=200,
                    wire_dtype="float16")
    said: list[str] = []
    result = Simulator(run, eval_every=None, final_eval=False, progress=said.append).simulate()
    assert result.summary["diverged"]
    # (here the parameters outgrow float16 first: the run stops before sending them, naming the way out)
    assert any("float16 wire" in line and "--wire-dtype bfloat16" in line for line in said), said
    assert torch.isfinite(result.params).all()


def test_the_wire_dtype_is_a_run_setting_every_command_takes():
    assert RunConfig(wire_dtype="bfloat16").wire_torch_dtype == torch.bfloat16
    assert RunConfig().to_flags() == [] or "--wire-dtype" not in RunConfig().to_flags()
    assert RunConfig(wire_dtype="float16").to_flags() == ["--wire-dtype", "float16"]
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        RunConfig(wire_dtype="int8")
    assert np.dtype("<i2").itemsize == 2  # (bfloat16's bits travel as int16 where numpy has no bfloat16)


def test_remote_optimizer_and_the_evaluator_on_a_bfloat16_run(start_live_server):
    """A user's loop through RemoteOptimizer sends bfloat16 gradients and loads the bfloat16 parameters widened;
    at the end it loads the run's float32 final parameters, which the evaluator evaluates too."""
    from ormo_ps import RemoteOptimizer
    from ormo_ps.common.models import MLP
    from ormo_ps.worker.evaluator import run_evaluator
    from tests.test_byom import flat, user_loop

    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, lr=0.05, iterations=8,
                    wire_dtype="bfloat16")
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=30.0)
    try:
        torch.manual_seed(0)
        model = MLP((1, 8, 8), 10)
        with RemoteOptimizer(model, server=live.target) as opt:
            assert opt._client._sender.wire_dtype == torch.bfloat16
            # The parameters it trains at are the server's w_0 rounded to bfloat16: 8 significant bits.
            w0 = live.on_loop(lambda: live.service.core.w.clone())
            assert torch.equal(flat(model), round_trip(w0, torch.bfloat16)) and not torch.equal(flat(model), w0)
            assert user_loop(opt, model, 1) == 8 and opt.done
        served = live.on_loop(lambda: live.service.core.w.clone())
        assert torch.equal(flat(model), served)  # the final ones, float32, from GetParameters
        assert status(live).gradients_applied == 8
        record = run_evaluator(live.target, server_timeout=10)
        assert record is not None and record["iteration"] == 8
    finally:
        stop()
