"""The sharded arithmetic (server/shards.py) against one server: for every rule, random arrival orders with
rejected pushes (a NaN in one slice, an overflow in one slice), workers leaving and rejoining and the
synchronous scheduler, the parameters put together from S = 1..4 slices equal one ServerCore's bit for bit
after every event, and so do the parameters each dispatch carries."""

from __future__ import annotations

import random

import pytest
import torch

from ormo_ps.server.algorithms import ALGORITHMS
from ormo_ps.server.config import RunConfig
from ormo_ps.server.core import PushRejected, ServerCore
from ormo_ps.server.shards import ALIGN, ShardedCore, shard_bounds

K = 4
NUMEL = 4 * ALIGN + 389  # the last slice is not a whole number of blocks


@pytest.mark.parametrize("numel,shards", [(1, 1), (1024, 1), (1025, 2), (5000, 3), (4 * ALIGN + 389, 5),
                                          (11_000_000, 8)])
def test_slices_cover_the_vector_cut_at_multiples_of_align_and_balanced(numel, shards):
    bounds = shard_bounds(numel, shards)
    assert len(bounds) == shards and bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a < b for a, b in bounds)
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
    assert all(a % ALIGN == 0 for a, _ in bounds)
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 2 * ALIGN


def test_more_shards_than_blocks_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="3 shards need at least 3 blocks of 1024 parameters"):
        shard_bounds(2048, 3)


def run_config(algo: str, lr: float = 4.0) -> RunConfig:
    """eta = 4: not a training run, an arithmetic one, where a gradient of 3e38 overflows the state at once."""
    options = {"ringmaster_r": 3} if algo == "ringmaster" else {"dn_buffer": 3} if algo == "dn" else {}
    return RunConfig(algo=algo, workers=K, lr=lr, momentum=0.9, lr_milestones=(), iterations=10_000, **options)


def equal_dispatches(a, b) -> bool:
    return (len(a) == len(b) and all(x.workers == y.workers and x.iteration_index == y.iteration_index
                                     and torch.equal(x.params, y.params) for x, y in zip(a, b)))


def drive(algo: str, shards: int, seed: int, events: int = 160) -> list[str]:
    """One random run, the same events given to one ServerCore and to a ShardedCore, compared after each; the
    reasons of the pushes both refused."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params0 = torch.randn(NUMEL, generator=gen, dtype=torch.float32)
    run = run_config(algo)
    single, sharded = ServerCore(params0, run), ShardedCore(params0, run, shards=shards)
    bounds = sharded.bounds
    first = single.start()
    assert equal_dispatches([first], [sharded.start()])
    held = {k: first.params.clone() for k in first.workers}  # what each worker computes its gradient at
    index = {k: first.iteration_index for k in first.workers}
    gone: set[int] = set()
    rejected: list[str] = []
    for _ in range(events):
        roll = rng.random()
        if roll < 0.05 and len(gone) < K - 1:  # a worker leaves; its gradient in flight is lost
            k = rng.choice(sorted(set(range(K)) - gone))
            gone.add(k)
            held.pop(k, None)
            answers = single.deactivate(k), sharded.deactivate(k)
        elif roll < 0.12 and gone:  # one comes back
            k = rng.choice(sorted(gone))
            gone.discard(k)
            answers = [d for d in [single.rejoin(k)] if d], [d for d in [sharded.rejoin(k)] if d]
        else:
            ready = sorted(held)
            if not ready:
                continue
            k = rng.choice(ready)
            g = torch.tanh(held[k]) + 0.1 * torch.randn(NUMEL, generator=gen)  # finite wherever held[k] is
            kind = rng.random()
            if kind < 0.05:  # a NaN in one slice: refused everywhere
                a, b = bounds[rng.randrange(len(bounds))]
                g[rng.randrange(a, b)] = float("nan")
            elif kind < 0.08:  # finite but huge in one slice: the update would overflow, refused everywhere
                a, b = bounds[rng.randrange(len(bounds))]
                g[rng.randrange(a, b)] = 3e38
            outcomes = []
            for core in (single, sharded):
                try:
                    outcomes.append(core.push(k, g, index[k]))
                except PushRejected as e:
                    outcomes.append(e.reason)
            if isinstance(outcomes[0], str):
                assert outcomes[1] == outcomes[0], outcomes
                rejected.append(outcomes[0])
                continue
            del held[k]
            answers = outcomes[0], outcomes[1]
        assert equal_dispatches(*answers), (algo, shards, seed)
        for d in answers[0]:
            for w in d.workers:
                held[w], index[w] = d.params.clone(), d.iteration_index
        assert torch.equal(single.current_params(), sharded.current_params()), (algo, shards, seed)
        assert single.iteration == sharded.iteration and single.waiting_set == sharded.lead.waiting_set
    for core in sharded.cores:  # every slice at the same point of the run
        assert core.iteration == single.iteration and core.discarded == single.discarded
    assert single.iteration > 40, "the run hardly moved: the test proves little"
    return rejected


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_sharded_parameters_equal_one_servers_after_every_push(algo):
    torch.set_num_threads(1)
    reasons = [r for shards in (1, 2, 3, 4) for seed in (1, 2) for r in drive(algo, shards, seed)]
    assert {"nonfinite", "overflow"} <= set(reasons), f"the all-or-nothing paths went untested: {set(reasons)}"


def test_an_overflowing_slice_leaves_every_slice_unchanged():
    run = run_config("ormo", lr=100.0)
    params0 = torch.ones(NUMEL)
    sharded = ShardedCore(params0, run, shards=3)
    sharded.start()
    before = sharded.state_dict()
    g = torch.zeros(NUMEL)
    g[sharded.bounds[2][0] + 7] = 3e38  # only the last slice overflows; the first two would apply fine
    g[:10] = 1.0
    with pytest.raises(PushRejected) as e:
        sharded.push(0, g, 0)
    assert e.value.reason == "overflow"
    after = sharded.state_dict()
    for s0, s1 in zip(before["shards"], after["shards"]):
        assert torch.equal(s0["w"], s1["w"]) and torch.equal(s0["rule"]["u"], s1["rule"]["u"])
        assert s0["iteration"] == s1["iteration"] == 0


def test_a_checkpoint_is_one_cut_and_resumes_to_the_same_parameters():
    run = run_config("smega2")
    params0 = torch.randn(NUMEL, generator=torch.Generator().manual_seed(5))
    a = ShardedCore(params0, run, shards=3)
    d = a.start()
    gen = torch.Generator().manual_seed(6)
    index = {}
    for k in range(K):
        for sent in a.push(k, torch.randn(NUMEL, generator=gen), d.iteration_index):
            index |= dict.fromkeys(sent.workers, sent.iteration_index)
    state = a.state_dict()
    b = ShardedCore(params0, run, shards=3)
    b.load_state_dict(state)
    assert torch.equal(a.current_params(), b.current_params()) and b.iteration == a.iteration == K
    g = torch.randn(NUMEL, generator=gen)
    assert equal_dispatches(a.push(0, g, index[0]), b.push(0, g.clone(), index[0]))
    torn = b.state_dict()
    torn["shards"][1]["iteration"] += 1
    with pytest.raises(ValueError, match="different iterations"):
        ShardedCore(params0, run, shards=3).load_state_dict(torn)
    with pytest.raises(ValueError, match="cut the parameter at"):
        ShardedCore(params0, run, shards=2).load_state_dict(state)


def test_ps_sim_with_shards_trains_to_the_parameters_of_one_server(tmp_path):
    """A whole simulated run (digits, an MLP of 9,610 parameters, K=4 with a slow worker): with its server's
    arithmetic in 3 slices, final.pt and every progress record equal those of the run with one."""
    from ormo_ps.common.metrics import read_metrics
    from ormo_ps.sim.cli import main as sim_main

    for shards in (1, 3):
        sim_main(["--algo", "ormo", "--workers", "4", "--slow-workers", "1", "--dataset", "digits", "--model", "mlp",
                  "--iterations", "300", "--shards", str(shards), "--out", str(tmp_path / f"s{shards}"), "-q"])
    one, three = (torch.load(tmp_path / f"s{s}" / "final.pt", weights_only=True) for s in (1, 3))
    assert one["iteration"] == three["iteration"] == 300
    assert torch.equal(one["params"], three["params"])
    progress = [[{k: r[k] for k in ("iteration", "train_loss")} for r in read_metrics(tmp_path / f"s{s}" / "metrics.jsonl")
                 if r["event"] == "progress"] for s in (1, 3)]
    assert progress[0] == progress[1] and len(progress[0]) > 3
