"""Delayed Nesterov and Ringmaster ASGD (#26) beyond the core: the worked example over the wire, the
simulator, and the commands that train the default job with them (tests/test_algorithms.py has the rules)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from ormo_ps.common.codec import decode
from ormo_ps.server.config import RunConfig
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator
from tests.conftest import raw_worker_factory
from tests.test_algorithms import ARRIVALS, WORKED
from tests.test_service import NUM_PARAMETERS, gradient_message, status


@pytest.mark.parametrize("rule,options", [("dn", {}), ("dn-c", {"dn_activation": 0.25}), ("ringmaster", {})])
def test_the_worked_example_over_the_wire(start_live_server, rule, options):
    """Two raw workers replay the arrivals A A A B A B A with gradients 1..7 (times a vector of ones): the
    server sends back w_0 + the worked example's values, and Ringmaster's discarded gradient answers B with
    the current parameters and index, counted as discarded."""
    algo = "dn" if rule.startswith("dn") else rule
    run = RunConfig(algo=algo, workers=2, dataset="digits", model="mlp", batch_size=32, lr=1.0, momentum=0.5,
                    weight_decay=0.0, iterations=10**6, **options)
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, log_every=1000)
    try:
        w0 = live.on_loop(lambda: live.service.core.w.clone()).double()
        with raw_worker_factory(live) as make:
            workers = [make(), make()]
            for k, w in enumerate(workers):
                assert w.register(name=f"w{k}").worker_id == k
            for w in workers:
                w.ready()
            held = [w.parameters().iteration_index for w in workers]
            indexes = []
            for g, (k, expected) in enumerate(zip(ARRIVALS, WORKED[rule]), start=1):
                workers[k].send(gradient_message(held[k], torch.full((NUM_PARAMETERS,), float(g))))
                params = workers[k].parameters()
                held[k] = params.iteration_index
                indexes.append(params.iteration_index)
                got = decode(params.tensor).double()
                torch.testing.assert_close(got, w0 + float(Fraction(expected)), rtol=0, atol=1e-5)
        st = status(live)
        if rule == "ringmaster":
            assert indexes == [1, 2, 3, 3, 4, 5, 6]
            assert (st.iteration, st.gradients_applied, st.gradients_discarded, st.gradients_rejected) == (6, 6, 1, 0)
        else:
            assert indexes == [1, 2, 3, 4, 5, 6, 7] and st.gradients_discarded == 0
    finally:
        stop()


@pytest.fixture(scope="module")
def digits():
    from ormo_ps.common.data import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize("algo", ["dn", "ringmaster"])
def test_the_simulator_runs_its_length_in_applied_gradients(digits, algo):
    """A run of 120 iterations is 120 applied gradients; Ringmaster's discarded ones come on top (its slow
    workers' gradients, 4x late, are at least K=4 stale every time), and are no progress record."""
    run = RunConfig(algo=algo, workers=4, dataset="digits", model="mlp", batch_size=32, lr=0.05, iterations=120,
                    seed=2)
    sim = Simulator(run, ComputeTimeModel(jitter=0.2, slow_workers=1, slowdown=4), dataset=digits, eval_every=None,
                    final_eval=True, log_every=10)
    summary = sim.simulate().summary
    assert summary["iterations"] == 120 and sum(summary["gradients_per_worker"]) == 120
    assert summary["final_test_accuracy"] > 0.5
    if algo == "ringmaster":
        assert summary["gradients_discarded"] > 0 and max(map(int, summary["staleness_histogram"])) < 4
        assert summary["gradients_per_worker"][3] == 0  # the slow worker's are always too stale
    else:
        assert summary["gradients_discarded"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dn", "ringmaster"])
def test_ps_launch_trains_the_default_job(algo, tmp_path, capsys):
    """ps-server (through ps-launch: a server, four ps-worker processes, an evaluator) trains the default job
    with each (the CLI's --algo; the rules' options at their defaults, N = R = K). Margin: the simulator's
    same job under 12 timings (jitter 0.3-0.85, up to 2 workers up to 12x slower) ends at 0.946-0.953 (DN) and
    0.926-0.936 (Ringmaster) at this eta, and at 0.92 / 0.896 at eta 0.02."""
    from ormo_ps.launcher.cli import main as launch_main

    launch_main(["--algo", algo, "--workers", "4", "--epochs", "8", "--batch-size", "32", "--lr", "0.05",
                 "--out", str(tmp_path), "--eval-every", "0", "-q", "--timeout", "300"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["iterations"] == 8 * (1500 // 32) == result["gradients_applied"]
    assert result["final_test_accuracy"] > 0.8, result
