"""One faulty worker costs only its own gradients (server/faults.py): its non-finite gradients are refused and
counted per worker id across reconnects, it is dropped after three in a row, and the run goes on; the run
ends as diverged only when more than half of the workers' latest gradients are non-finite."""

from __future__ import annotations

import grpc
import pytest
import torch

from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.server.faults import FaultBook
from ormo_ps.server.config import RunConfig
from tests.conftest import LiveServer, RawWorker, raw_worker_factory
from tests.test_service import (MakeWorker, assert_aborted, counters, gradient_message, good_gradient, snapshot,
                                start_run, status)

NAN = torch.full((9610,), float("nan"))


# ----- the rule ----------------------------------------------------------------------------------------------
def test_one_worker_of_many_is_dropped_and_never_ends_the_run():
    book = FaultBook(16)
    verdicts = [book.nonfinite(3) for _ in range(10)]
    assert [v.drop_worker for v in verdicts] == [False, False] + [True] * 8
    assert not any(v.run_diverged for v in verdicts)
    book.applied(3)  # one of its gradients went through: it starts again
    assert book.nonfinite(3).drop_worker is False


def test_more_than_half_of_the_workers_end_the_run():
    book = FaultBook(16)
    assert not any(book.nonfinite(k).run_diverged for k in range(8))  # half: not yet
    assert book.nonfinite(8).run_diverged  # 9 of 16
    book = FaultBook(16)
    for k in range(9):
        book.nonfinite(k)
    book.applied(0)  # worker 0's next gradient was fine: 8 of 16 again
    assert not book.run_diverging()


def test_with_one_worker_three_in_a_row_end_the_run():
    book = FaultBook(1)
    assert [book.nonfinite(0).run_diverged for _ in range(3)] == [False, False, True]


def test_the_counts_survive_a_checkpoint():
    book = FaultBook(4)
    book.nonfinite(2)
    book.nonfinite(2)
    again = FaultBook(4)
    again.load_state_dict(book.state_dict())
    assert again.nonfinite(2).drop_worker


# ----- over the wire ----------------------------------------------------------------------------------------
def _rejoin(make: MakeWorker, worker: int) -> tuple[RawWorker, int]:
    """Reconnect as `worker` (its id asked back), say Ready; the stream and the index of the parameters sent."""
    w = make()
    assert w.register(worker_id=worker, name="faulty").worker_id == worker
    w.ready()
    return w, w.parameters().iteration_index


def test_a_worker_sending_nan_is_dropped_while_the_honest_one_trains_on(server: LiveServer, raw_workers: MakeWorker):
    """The issue's measurement: three NaN gradients from one client, reconnecting between them, ended the run
    (the server exited 3). Now the client is dropped, and the other worker's run goes on."""
    honest, faulty = start_run(raw_workers)
    index = held = 0
    for attempt in range(5):
        if attempt:
            faulty, held = _rejoin(raw_workers, 1)
        faulty.send(gradient_message(held, NAN))
        if attempt < 2:
            assert_aborted(faulty, grpc.StatusCode.INVALID_ARGUMENT, "is not finite")
        else:  # the third in a row, and every one after it until one of its gradients is applied
            assert_aborted(faulty, grpc.StatusCode.ABORTED, "worker 1 dropped: ")
        honest.send(gradient_message(index, good_gradient(attempt)))  # the honest worker's go through
        index = honest.parameters().iteration_index
    st = status(server)
    assert not st.diverged and not st.done and st.gradients_applied == 5
    assert counters(server) == (5, 5, {"nonfinite": 5})
    assert server.on_loop(lambda: server.service.counters.dropped_workers) == 3
    # Its count lasts until one of its gradients is applied; then it starts again.
    faulty, held = _rejoin(raw_workers, 1)
    faulty.send(gradient_message(held, good_gradient(9)))
    assert faulty.parameters().iteration_index == 6
    faulty.send(gradient_message(6, NAN))
    assert_aborted(faulty, grpc.StatusCode.INVALID_ARGUMENT, "is not finite")


def test_nan_from_both_workers_ends_the_run_as_diverged(start_live_server):
    run = RunConfig(algo="ormo", workers=2, dataset="digits", model="mlp", batch_size=32, iterations=1_000_000)
    server, stop_server = start_live_server(run, bind="127.0.0.1:0", linger=30.0, grace=1.0)
    try:
        with raw_worker_factory(server) as make:
            _both_diverge(server, make)
    finally:
        stop_server()


def _both_diverge(server: LiveServer, raw_workers: MakeWorker) -> None:
    a, b = start_run(raw_workers)
    before = snapshot(server)
    a.send(gradient_message(0, NAN))
    assert_aborted(a, grpc.StatusCode.INVALID_ARGUMENT, "is not finite")
    b.send(gradient_message(0, NAN))
    assert_aborted(b, grpc.StatusCode.INVALID_ARGUMENT, "is not finite")
    a, held = _rejoin(raw_workers, 0)
    a.send(gradient_message(held, NAN))  # 2 of 2 workers, 3 in all
    stop = a.recv()
    assert stop.WhichOneof("payload") == "stop" and stop.stop.reason == pb.STOP_REASON_DIVERGED
    assert "2 of 2 workers' latest gradients were non-finite" in stop.stop.detail
    st = status(server)
    assert st.diverged and st.done
    assert torch.equal(snapshot(server)["w"], before["w"])


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_gradients_count_like_nan(server: LiveServer, raw_workers: MakeWorker, value):
    honest, faulty = start_run(raw_workers)
    g = torch.full((9610,), value)
    held = 0
    for attempt in range(3):
        if attempt:
            faulty, held = _rejoin(raw_workers, 1)
        faulty.send(gradient_message(held, g))
        code = grpc.StatusCode.ABORTED if attempt == 2 else grpc.StatusCode.INVALID_ARGUMENT
        assert faulty.expect_abort().code() == code
    assert not status(server).diverged
