"""The update rules against docs/algorithms.md: worked examples, exact equivalences and the OrMo invariant."""

from __future__ import annotations

import random
from fractions import Fraction as F

import pytest
import torch

from ormo_ps.server.algorithms import ALGORITHMS
from ormo_ps.server.algorithms.ormo import delay_adaptive_lr, gradient_group
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import ServerCore
from ormo_ps.server.schedule import LRSchedule

# ---------------------------------------------------------------------------------------------
# The worked example: K=2, beta=1/2, eta=1, w0=0, arrivals A A A B A B A, gradients 1..7.
ARRIVALS = [0, 0, 0, 1, 0, 1, 0]
WORKED = {
    "asgd": ["-1", "-3", "-6", "-10", "-15", "-21", "-28"],
    "asgdm": ["-1", "-7/2", "-31/4", "-111/8", "-351/16", "-1023/32", "-2815/64"],
    "shifted-momentum": ["-1", "-7/2", "-31/4", "-47/4", "-151/8", "-215/8", "-599/16"],
    "smega2": ["-5/4", "-9/2", "-69/8", "-63/4", "-369/16", "-275/8", "-1441/32"],
    "ormo": ["-1", "-7/2", "-13/2", "-65/4", "-85/4", "-277/8", "-333/8"],
    "ormo-vanilla": ["-1", "-7/2", "-13/2", "-53/4", "-73/4", "-229/8", "-285/8"],
    "ormo-da": ["-1", "-7/2", "-13/2", "-167/12", "-227/12", "-257/8", "-313/8"],
    # The 2024-25 successors (docs/algorithms.md): Delayed Nesterov with N = K = 2, c = 0 and c = 1/4;
    # Ringmaster ASGD with R = K = 2 (the fourth arrival, B's gradient 4 from w_0 at t=3, is discarded).
    "dn": ["-1/2", "-9/4", "-15/4", "-63/8", "-83/8", "-275/16", "-331/16"],
    "dn-c": ["-1/2", "-33/16", "-15/4", "-235/32", "-83/8", "-1039/64", "-331/16"],
    "ringmaster": ["-1", "-3", "-6", "-6", "-11", "-17", "-24"],
}
RULE_OPTIONS = {"ormo-vanilla": ("ormo", {"vanilla_sgd_step": True}), "dn-c": ("dn", {"dn_activation": 0.25})}
# Delayed Nesterov's state after each arrival (m, D), c = 0 and c = 1/4 alike: flushes at t = 1, 3, 5.
DN_TRACE = [("0", "1"), ("3/2", "0"), ("3/2", "3"), ("17/4", "0"), ("17/4", "5"), ("61/8", "0"), ("61/8", "7")]
# Ringmaster: (the index sent back, the iteration after) for each arrival.
RINGMASTER_TRACE = [(1, 1), (2, 2), (3, 3), (3, 3), (4, 4), (5, 5), (6, 6)]
# OrMo's full trace: (ite, group b, I, u, w) after each iteration.
ORMO_TRACE = [
    (0, 0, 0, "1", "-1"),
    (1, 1, 1, "5/2", "-7/2"),
    (2, 1, 1, "11/2", "-13/2"),
    (0, 0, 2, "15/4", "-65/4"),
    (3, 2, 2, "35/4", "-85/4"),
    (4, 2, 3, "59/8", "-277/8"),
    (5, 3, 3, "115/8", "-333/8"),
]


def make_core(algo: str, k: int, lr=1.0, beta=0.5, numel=1, dtype=torch.float64, **kw) -> ServerCore:
    """A core with a constant eta (or the given schedule) and no end."""
    schedule = lr if isinstance(lr, LRSchedule) else LRSchedule(lr)
    run = RunConfig(algo=algo, workers=k, momentum=beta, iterations=10**9, lr=schedule.base_lr,
                    warmup_epochs=schedule.warmup_epochs, lr_milestones=schedule.milestones, lr_gamma=schedule.gamma,
                    **kw)
    return ServerCore(torch.zeros(numel, dtype=dtype), run, schedule.iterations_per_epoch)


class Driver:
    """Plays workers against a core: each worker holds the last (params, index) sent to it."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.held: dict[int, tuple[torch.Tensor, int]] = {}
        self.sent: list[torch.Tensor] = []
        self._deliver([core.start()])

    def _deliver(self, dispatches) -> None:
        for d in dispatches:
            for k in d.workers:
                self.held[k] = (d.params.clone(), d.iteration_index)
            self.sent.append(d.params.clone())

    def ready(self) -> list[int]:
        return sorted(self.held)

    def push(self, worker: int, grad: torch.Tensor) -> int:
        _, ite = self.held.pop(worker)
        self._deliver(self.core.push(worker, grad, ite))
        return ite


def scalar(x: float) -> torch.Tensor:
    return torch.tensor([float(x)], dtype=torch.float64)


def assert_exact(got: torch.Tensor, expected: str) -> None:
    value = float(F(expected))
    assert got.item() == pytest.approx(value, rel=1e-15, abs=1e-15), (got.item(), expected)


@pytest.mark.parametrize("rule", sorted(WORKED))
def test_worked_example_parameters_sent(rule):
    algo, options = RULE_OPTIONS.get(rule, (rule, {}))
    drv = Driver(make_core(algo, 2, **options))
    for g, k in zip(range(1, 8), ARRIVALS):
        drv.push(k, scalar(g))
    sent_after_each = drv.sent[1:]  # the first dispatch is (w_0, 0) to both workers
    assert len(sent_after_each) == 7
    for got, expected in zip(sent_after_each, WORKED[rule]):
        assert_exact(got, expected)


def test_worked_example_ormo_full_trace():
    core = make_core("ormo", 2)
    drv = Driver(core)
    for t, (g, k) in enumerate(zip(range(1, 8), ARRIVALS)):
        ite = drv.push(k, scalar(g))
        exp_ite, exp_b, exp_i, exp_u, exp_w = ORMO_TRACE[t]
        assert ite == exp_ite
        assert gradient_group(ite, 2) == exp_b
        assert core.rule.latest_group == exp_i
        assert_exact(core.rule.u, exp_u)
        assert_exact(core.w, exp_w)
    assert core.iteration == 7


@pytest.mark.parametrize("c", [0.0, 0.25])
def test_worked_example_delayed_nesterov_trace(c):
    core = make_core("dn", 2, dn_activation=c)
    drv = Driver(core)
    for t, (g, k) in enumerate(zip(range(1, 8), ARRIVALS)):
        drv.push(k, scalar(g))
        m, d = DN_TRACE[t]
        assert_exact(core.rule.m, m)
        assert_exact(core.rule.sum, d)
        assert core.rule.arrivals == t + 1 and core.iteration == t + 1
    # Over a cycle the momentum's weights add up to 1 whatever c: before each flush w is c = 0's.
    assert [WORKED["dn"][t] == WORKED["dn-c"][t] for t in range(7)] == [True, False, True, False, True, False, True]


def test_worked_example_ringmaster_discards_the_stale_gradient():
    core = make_core("ringmaster", 2)
    drv = Driver(core)
    for t, (g, k) in enumerate(zip(range(1, 8), ARRIVALS)):
        drv.push(k, scalar(g))
        assert (drv.held[k][1], core.iteration) == RINGMASTER_TRACE[t]
    summary = core.summary()
    assert summary["gradients_discarded"] == 1 and summary["gradients_per_worker"] == [5, 1]
    assert summary["staleness_histogram"] == {"0": 4, "1": 2}  # the applied ones only: the discarded had delay 3
    assert core.workers[1].gradients_discarded == 1


@pytest.mark.parametrize("r,discarded", [(1, 2), (2, 1), (3, 1), (4, 0)])
def test_ringmaster_r_is_the_first_delay_discarded(r, discarded):
    """The worked example's arrivals have delays 0 0 0 3, then 0 1 1 (R >= 2) or 0 1 0 (R = 1: B's second
    gradient, delay 1, is discarded too): R=4 keeps them all (it is ASGD)."""
    core = make_core("ringmaster", 2, ringmaster_r=r)
    drv = Driver(core)
    for g, k in zip(range(1, 8), ARRIVALS):
        drv.push(k, scalar(g))
    assert core.discarded == discarded and core.iteration == 7 - discarded
    if discarded == 0:
        assert_exact(core.w, WORKED["asgd"][-1])


def test_ringmaster_discards_nothing_under_the_synchronous_scheduler():
    core = make_core("ringmaster", 3, ringmaster_r=1, scheduler="sync")
    drv = Driver(core)
    for _ in range(4):
        for k in (0, 1, 2):
            drv.push(k, scalar(1))
    assert core.discarded == 0 and core.iteration == 12


def test_gradient_group_and_delay_adaptive_rule():
    assert [gradient_group(i, 2) for i in range(7)] == [0, 1, 1, 2, 2, 3, 3]
    assert [gradient_group(i, 3) for i in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert delay_adaptive_lr(0.1, 16, 16) == 0.1
    assert delay_adaptive_lr(0.1, 32, 16) == pytest.approx(0.05)
    assert delay_adaptive_lr(1.0, 3, 2) == pytest.approx(2 / 3)


def test_smega2_estimate_is_sent_but_theta_is_the_parameter():
    drv = Driver(make_core("smega2", 2))
    drv.push(0, scalar(1))
    assert_exact(drv.sent[-1], "-5/4")
    assert_exact(drv.core.current_params(), "-1")


# ---------------------------------------------------------------------------------------------
# Exact equivalences


def test_ormo_with_one_worker_is_torch_heavy_ball_sgd():
    torch.manual_seed(0)
    eta, beta, n = 0.05, 0.9, 1000
    w0 = torch.randn(n, dtype=torch.float64)
    core = ServerCore(w0, RunConfig(algo="ormo", workers=1, lr=eta, momentum=beta, lr_milestones=(), iterations=10**9))
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=eta, momentum=beta, dampening=0)
    drv = Driver(core)
    for _ in range(200):
        params, _ = drv.held[0]
        torch.testing.assert_close(params, p.detach(), rtol=1e-12, atol=1e-12)
        g = torch.randn(n, dtype=torch.float64) + 0.1 * params  # depends on the parameter it was computed at
        drv.push(0, g)
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(core.w, p.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ormo_with_synchronous_scheduler_is_ssgdm(k):
    eta, beta, n, rounds = 0.1, 0.9, 50, 12
    gen = torch.Generator().manual_seed(k)
    core = make_core("ormo", k, lr=eta, beta=beta, numel=n, scheduler="sync")
    ssgdm = make_core("ssgdm", k, lr=eta, beta=beta, numel=n)
    drivers = [Driver(core), Driver(ssgdm)]
    big_w = torch.zeros(n, dtype=torch.float64)
    big_u = torch.zeros(n, dtype=torch.float64)
    rng = random.Random(k)
    for r in range(rounds):
        grads = {w: torch.randn(n, generator=gen, dtype=torch.float64) for w in range(k)}
        order = list(range(k))
        rng.shuffle(order)
        for drv in drivers:
            for w in order:
                assert drv.held[w][1] == r * k  # every worker computed at w_{rK}, index rK
                drv.push(w, grads[w])
        big_u = beta * big_u + eta * sum(grads.values())
        big_w = big_w - big_u
        for drv in drivers:
            torch.testing.assert_close(drv.core.w, big_w, rtol=1e-12, atol=1e-12)
            assert drv.ready() == list(range(k))


def test_ssgd_applies_every_gradient_and_answers_once_per_round():
    core = make_core("ssgd", 3, lr=0.5)
    drv = Driver(core)
    drv.push(2, scalar(1))
    drv.push(0, scalar(2))
    assert drv.ready() == [1]  # 0 and 2 wait in the waiting set
    assert core.waiting_set == {0, 2}
    drv.push(1, scalar(3))
    assert drv.ready() == [0, 1, 2]
    assert all(drv.held[w][1] == 3 for w in range(3))
    assert_exact(core.w, "-3")


@pytest.mark.parametrize("algo", ["ormo", "ormo-da"])
@pytest.mark.parametrize("k", [2, 3, 16])
def test_ormo_with_zero_momentum_is_asgd(algo, k):
    n = 20
    gen = torch.Generator().manual_seed(k)
    rng = random.Random(k)
    ormo, asgd = Driver(make_core(algo, k, lr=0.1, beta=0.0, numel=n)), Driver(make_core("asgd", k, lr=0.1, beta=0.0, numel=n))
    for _ in range(10 * k):
        w = rng.choice(ormo.ready())
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        ite = ormo.push(w, g)
        t = ormo.core.iteration - 1
        # ASGD with the same per-gradient rate: OrMo-DA's adaptation is applied to the gradient
        scale = delay_adaptive_lr(1.0, t - ite, k) if algo == "ormo-da" else 1.0
        asgd.push(w, g * scale)
        torch.testing.assert_close(ormo.core.w, asgd.core.w, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# The invariant and the group bookkeeping, for random arrival orders


def random_run(algo: str, k: int, steps: int, seed: int, n: int = 8, schedule: LRSchedule | None = None):
    """Yields (core, per-step eta_s * g_s) for a random arrival order with heavy, uneven staleness."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    core = make_core(algo, k, lr=schedule or LRSchedule(0.1), beta=0.9, numel=n)
    drv = Driver(core)
    speeds = [rng.choice([1, 1, 1, 8]) for _ in range(k)]  # some workers much slower
    for _ in range(steps):
        ready = drv.ready()
        w = rng.choices(ready, weights=[1 / speeds[x] for x in ready])[0]
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        t = core.iteration
        ite = drv.held[w][1]
        group_before = core.rule.latest_group
        drv.push(w, g)
        eta = core.rule.effective_lr(core.lr_schedule(t), ite, t)
        yield core, eta * g, ite, group_before


@pytest.mark.parametrize("algo", ["ormo", "ormo-da"])
@pytest.mark.parametrize("k", [2, 3, 16, 64])
def test_ormo_invariant_and_groups_for_random_arrivals(algo, k):
    beta = 0.9
    schedule = LRSchedule(0.1, iterations_per_epoch=50, warmup_epochs=1, milestones=(3, 5), gamma=0.1)
    w0 = None
    total = None
    group_counts: dict[int, int] = {}
    for core, step, ite, _ in random_run(algo, k, steps=20 * k + 300, seed=k, schedule=schedule):
        if w0 is None:
            w0 = torch.zeros_like(core.w)
            total = torch.zeros_like(core.w)
        total += step
        lhs = core.w - beta / (1 - beta) * core.rule.u
        rhs = w0 - total / (1 - beta)
        torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)
        b = gradient_group(ite, k)
        assert b <= core.rule.latest_group  # the group index is never ahead of the latest group
        group_counts[b] = group_counts.get(b, 0) + 1
        assert group_counts[b] <= k
        assert core.rule.latest_group == gradient_group(core.iteration - 1, k)
    # every group that can be complete (all its parameters were sent long ago and returned) holds K
    assert group_counts[0] <= k


def test_ormo_groups_fill_to_exactly_k():
    k = 4
    core = make_core("ormo", k, numel=1)
    drv = Driver(core)
    counts: dict[int, int] = {}
    rng = random.Random(1)
    for _ in range(400):
        w = rng.choice(drv.ready())
        ite = drv.push(w, scalar(1))
        counts[gradient_group(ite, k)] = counts.get(gradient_group(ite, k), 0) + 1
    # drain: let every worker return the parameter it holds
    for w in drv.ready():
        ite = drv.push(w, scalar(1))
        counts[gradient_group(ite, k)] = counts.get(gradient_group(ite, k), 0) + 1
    complete = [b for b in counts if b < gradient_group(core.iteration - 2 * k, k)]
    assert complete and all(counts[b] == k for b in complete)


# ---------------------------------------------------------------------------------------------
# Float32 tensors of model size against the float64 scalar reference


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_float32_model_size_tensors_agree_with_float64_scalar_reference(algo):
    """Every rule is linear per coordinate: with gradients g_t * c, w_t(c) = w_t(scalar) * c."""
    k, n, steps = 4, 270_000, 40
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    c = torch.rand(n, generator=gen, dtype=torch.float32) * 2 - 1
    ref = Driver(make_core(algo, k, lr=0.1, beta=0.9, numel=1, dtype=torch.float64))
    big = Driver(make_core(algo, k, lr=0.1, beta=0.9, numel=n, dtype=torch.float32))
    for _ in range(steps):
        w = rng.choice(ref.ready())
        g = rng.uniform(-1, 1)
        ref.push(w, scalar(g))
        big.push(w, c * g)
        expected = (ref.core.w.item() * c.double())
        torch.testing.assert_close(big.core.w.double(), expected, rtol=1e-5, atol=1e-6)
        assert big.sent[-1].dtype == torch.float32
        torch.testing.assert_close(big.sent[-1].double(), ref.sent[-1].item() * c.double(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Registry, schedule, state


def test_registry_has_every_method_and_unknown_names_list_them():
    assert set(ALGORITHMS) == {"asgd", "asgdm", "shifted-momentum", "smega2", "ormo", "ormo-da", "ssgd", "ssgdm",
                               "dn", "ringmaster"}
    with pytest.raises(ValueError, match="algo must be one of asgd, asgdm, dn, ormo, ormo-da, ringmaster"):
        make_core("adam", 2)
    with pytest.raises(ValueError, match="ablation"):
        make_core("asgd", 2, vanilla_sgd_step=True)
    with pytest.raises(ValueError, match="dn_buffer is an option of algo 'dn'; it does not apply to algo 'ormo'"):
        make_core("ormo", 2, dn_buffer=4)
    with pytest.raises(ValueError, match="ringmaster_r is an option of algo 'ringmaster'"):
        make_core("asgd", 2, ringmaster_r=4)
    with pytest.raises(ValueError, match="ringmaster_r must be >= 1"):
        make_core("ringmaster", 2, ringmaster_r=0)
    with pytest.raises(ValueError, match="momentum"):
        make_core("ormo", 2, beta=1.0)
    with pytest.raises(ValueError, match="scheduler"):
        make_core("ormo", 2, scheduler="bulk")


def test_lr_schedule_warmup_and_step_decay():
    s = LRSchedule(0.4, iterations_per_epoch=10, warmup_epochs=2, milestones=(5, 8), gamma=0.1)
    assert s(0) == pytest.approx(0.02)
    assert s(9) == pytest.approx(0.2)
    assert s(19) == pytest.approx(0.4)
    assert s(20) == pytest.approx(0.4)
    assert s(49) == pytest.approx(0.4)
    assert s(50) == pytest.approx(0.04)
    assert s(80) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        LRSchedule(0.1, iterations_per_epoch=0)
    # The rate's own rules are the run's settings, checked once, by RunConfig.
    for bad, field in [(dict(lr=0), "lr must be > 0"), (dict(lr_milestones=(5, 3)), "lr_milestones"),
                       (dict(lr_gamma=0), "lr_gamma must be in"), (dict(warmup_epochs=-1), "warmup_epochs")]:
        with pytest.raises(ValueError, match=field):
            RunConfig(**bad)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_state_dict_round_trip_continues_identically(algo):
    k, n = 3, 10
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(40)]
    order = [random.Random(5).randrange(k) for _ in range(40)]

    def run(core, drv, steps):
        for g, w in steps:
            if w not in drv.ready():
                w = drv.ready()[0]
            drv.push(w, g)

    a = make_core(algo, k, lr=0.1, beta=0.9, numel=n)
    da = Driver(a)
    run(a, da, list(zip(grads[:20], order[:20])))
    state = a.state_dict()
    b = make_core(algo, k, lr=0.1, beta=0.9, numel=n)
    b.load_state_dict(state)
    db = Driver.__new__(Driver)
    db.core, db.held, db.sent = b, dict(da.held), []
    run(a, da, list(zip(grads[20:], order[20:])))
    run(b, db, list(zip(grads[20:], order[20:])))
    assert torch.equal(a.w, b.w)
    assert a.iteration == b.iteration == 40
