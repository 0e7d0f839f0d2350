"""ServerCore bookkeeping: bad pushes are refused without changing state; workers leave and rejoin."""

from __future__ import annotations

import pytest
import torch

from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import PushRejected, ServerCore


def core_for(algo="ormo", k=2, n=4, **kw) -> ServerCore:
    kw.setdefault("iterations", 10**9)
    kw = {"lr": 0.1} | kw
    return ServerCore(torch.zeros(n), RunConfig(algo=algo, workers=k, momentum=0.9, lr_milestones=(), **kw))


def snapshot(core: ServerCore):
    state = core.state_dict()
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif key == "rule":
            for rk in a[key]:
                va, vb = a[key][rk], b[key][rk]
                assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
        else:
            assert a[key] == b[key], key


BAD_PUSHES = [
    ("unknown worker", dict(worker=7), "NOT_FOUND", "unknown worker id 7"),
    ("negative worker", dict(worker=-1), "NOT_FOUND", "unknown worker"),
    ("index from the future", dict(ite=99), "INVALID_ARGUMENT", "from the future"),
    ("index not the one sent", dict(ite=0, worker=0), "INVALID_ARGUMENT", "was sent parameters with index 1"),
    ("wrong size", dict(grad=torch.ones(5)), "INVALID_ARGUMENT", "expected a flat vector of 4"),
    ("wrong shape", dict(grad=torch.ones(2, 2)), "INVALID_ARGUMENT", "flat vector"),
    ("wrong dtype", dict(grad=torch.ones(4, dtype=torch.float64)), "INVALID_ARGUMENT", "dtype"),
    ("NaN", dict(grad=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "INVALID_ARGUMENT", "NaN"),
    ("Inf", dict(grad=torch.tensor([0.0, float("inf"), 0.0, 0.0])), "INVALID_ARGUMENT", "1 Inf of 4 values"),
]


@pytest.mark.parametrize("name,override,code,message", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES])
def test_bad_push_is_rejected_and_changes_nothing(name, override, code, message):
    core = core_for()
    core.start()
    core.push(0, torch.ones(4), 0)  # worker 0 now holds index 1, worker 1 index 0
    before = snapshot(core)
    args = dict(worker=0, grad=torch.ones(4), ite=1) | override
    with pytest.raises(PushRejected, match=message) as info:
        core.push(args["worker"], args["grad"], args["ite"])
    assert info.value.code == code
    assert_same_state(before, snapshot(core))
    core.push(0, torch.ones(4), 1)  # the run goes on
    assert core.iteration == 2


def test_nonfinite_gradients_can_be_allowed():
    core = core_for("asgd", allow_nonfinite=True)
    core.start()
    core.push(0, torch.tensor([float("nan"), 0, 0, 0]), 0)
    assert torch.isnan(core.w[0])


def test_push_before_start_after_done_and_while_waiting():
    core = core_for("ssgd", k=2, iterations=4)
    with pytest.raises(PushRejected, match="not started"):
        core.push(0, torch.ones(4), 0)
    core.start()
    core.push(0, torch.ones(4), 0)
    with pytest.raises(PushRejected, match="waiting set") as info:
        core.push(0, torch.ones(4), 0)
    assert info.value.code == "FAILED_PRECONDITION"
    (d,) = core.push(1, torch.ones(4), 0)
    assert d.workers == (0, 1) and d.iteration_index == 2
    core.push(0, torch.ones(4), 2)
    assert core.push(1, torch.ones(4), 2) == []  # the last iteration: nothing more is sent
    assert core.done
    with pytest.raises(PushRejected, match="finished"):
        core.push(0, torch.ones(4), 4)


def test_async_worker_leaves_and_rejoins_with_current_index():
    core = core_for("ormo", k=3)
    core.start()
    core.push(0, torch.ones(4), 0)
    core.push(1, torch.ones(4), 0)
    assert core.deactivate(2) == []
    with pytest.raises(PushRejected, match="not active"):
        core.push(2, torch.ones(4), 0)
    core.push(0, torch.ones(4), 1)
    d = core.rejoin(2)
    assert d.workers == (2,) and d.iteration_index == 3 == core.iteration
    core.push(2, torch.ones(4), 3)
    assert core.iteration == 4


def test_sync_round_completes_without_a_dropped_worker():
    core = core_for("ssgdm", k=3)
    core.start()
    core.push(0, torch.ones(4), 0)
    core.push(1, torch.ones(4), 0)
    (d,) = core.deactivate(2)  # the barrier no longer waits for worker 2
    assert d.workers == (0, 1) and d.iteration_index == 2
    core.push(0, torch.ones(4), 2)
    assert core.rejoin(2) is None  # mid-round: it waits for the round's end
    (d,) = core.push(1, torch.ones(4), 2)
    assert d.workers == (0, 1, 2) and d.iteration_index == 4


def test_bad_config_names_the_field():
    for kwargs, field in [(dict(k=0), "workers must be >= 1"), (dict(iterations=0), "iterations must be >= 1")]:
        with pytest.raises(ValueError, match=field):
            core_for(**kwargs)
    with pytest.raises(ValueError, match="flat"):
        ServerCore(torch.zeros(2, 2), RunConfig(algo="asgd", workers=1))


@pytest.mark.parametrize("algo", ["asgd", "asgdm", "shifted-momentum", "smega2", "ormo", "ormo-da", "dn",
                                  "ringmaster"])
def test_an_update_that_would_overflow_is_refused_and_the_state_stays_finite(algo):
    """Finite but huge gradients (3.4e38, near float32's largest) are applied while the result is finite;
    the one that would make the state infinite is refused and changes nothing."""
    core = core_for(algo, k=1)
    core.start()
    huge = torch.full((4,), 3.4e38)
    refused = None
    for _ in range(20):
        before = snapshot(core)
        try:
            (d,) = core.push(0, huge, core.iteration)
        except PushRejected as e:
            refused = e
            assert_same_state(before, snapshot(core))
            break
        assert all(torch.isfinite(t).all() for t in core._state_tensors()) and torch.isfinite(d.params).all()
    assert refused is not None and refused.reason == "overflow" and "non-finite" in str(refused)


def test_a_huge_learning_rate_never_makes_the_parameters_infinite():
    core = core_for("ormo", k=1, lr=1e30)
    core.start()
    outcomes = []
    for _ in range(30):
        try:  # a gradient that grows with the parameter, as a real model's does once it diverges
            core.push(0, core.w.abs() + 1.0, core.iteration)
            outcomes.append("applied")
        except PushRejected as e:
            outcomes.append(e.reason)
        assert torch.isfinite(core.w).all() and torch.isfinite(core.rule.u).all()
    assert outcomes[0] == "applied" and "overflow" in outcomes


def test_delayed_nesterov_with_activation_never_overflows_unnoticed():
    """DN's flush applies the momentum with weight 1 - c*N + c (here -6.5): larger than the other rules'
    coefficients, which its `growth` accounts for; with huge gradients the state stays finite."""
    core = core_for("dn", k=1, dn_buffer=16, dn_activation=0.5, lr=1.0)
    core.start()
    huge = torch.full((4,), 3.0e37)
    refused = 0
    for _ in range(64):
        try:
            (d,) = core.push(0, huge, core.iteration)
            assert torch.isfinite(d.params).all()
        except PushRejected as e:
            assert e.reason == "overflow"
            refused += 1
            break
        assert all(torch.isfinite(t).all() for t in core._state_tensors())
    assert refused == 1
