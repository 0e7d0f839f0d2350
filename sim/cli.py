"""`ps-sim`: run an experiment with K virtual workers in one process, reproducibly."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from ormo_ps.common import settings
from ormo_ps.common.cli_options import DEVICE_HELP, Device, run_cli, setup_logging
from ormo_ps.common.live_tensorboard import LiveTensorBoard, run_dir
from ormo_ps.common.live_tensorboard import check as check_tensorboard
from ormo_ps.common.data import iterations_per_epoch, load_dataset, split_validation
from ormo_ps.common.progress import Progress
from ormo_ps.server.config import RunConfig
from ormo_ps.sim.simulator import ComputeTimeModel, Simulator


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@settings.click_options(RunConfig)
@settings.click_options(ComputeTimeModel)
@click.option("--slow-fraction", type=click.FloatRange(min=0, max=1), default=None, hidden=True,
              help="Former name: --slow-workers round(F * K).")
@click.option("--slow-factor", type=click.FloatRange(min=1), default=None, hidden=True,
              help="Former name of --slowdown.")
@click.option("--eval-every", type=click.FloatRange(min=0), default=1.0,
              help="Evaluate every this many epochs (0: only at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="Progress record every this many iterations (default: a tenth of an epoch).")
@click.option("--validation-size", type=click.IntRange(min=0), default=0,
              help="Hold this many training samples out as a validation split (the same ones in every run): "
                   "evaluations report val_accuracy beside test_accuracy, for choosing hyperparameters.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/sim",
              help="Output directory: metrics.jsonl and final.pt.")
@click.option("--tensorboard", type=click.Path(), default=None, metavar="DIRECTORY",
              help="Write the progress and eval records as TensorBoard events as they are written, into "
                   "DIRECTORY/<--out's name>: `tensorboard --logdir DIRECTORY` shows the run while it trains.")
@click.option("--device", type=Device(), default="cpu", help=DEVICE_HELP)
@click.option("--batched/--one-at-a-time", default=None, show_default="batched on a GPU, one at a time on the CPU",
              help="Compute all outstanding workers' gradients in one vmapped call (equal to one at a time up to "
                   "float rounding), or each gradient when it arrives.")
@click.option("--batch-limit", type=click.IntRange(min=1), default=None,
              help="At most this many workers' gradients per batched call (default: all outstanding); bounds memory.")
@click.option("--shards", type=click.IntRange(min=1), default=1,
              help="The server's arithmetic as this many slices of the parameter (server/shards.py), as the "
                   "sharded server computes it: the same parameters bit for bit.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress lines.")
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logging.")
def cli(**kwargs) -> None:
    """Simulate an asynchronous (or synchronous) training run with K virtual workers.

    Every gradient is computed for real at the parameters its worker holds; a priority queue of virtual
    finish times decides the arrival order. The same --seed gives bit-identical final parameters on the CPU.
    On a GPU the outstanding gradients are computed together (--batched), many in one call.
    """
    run = settings.pop_settings(RunConfig, kwargs)
    _former_slow_flags(kwargs, run.workers)
    timing = settings.pop_settings(ComputeTimeModel, kwargs)
    setup_logging(kwargs.pop("verbose"))
    quiet = kwargs.pop("quiet")
    eval_every = kwargs.pop("eval_every") or None
    validation_size = kwargs.pop("validation_size")
    tensorboard = kwargs.pop("tensorboard")
    try:
        if tensorboard:
            check_tensorboard(tensorboard)  # (its own words name the directory given)
        listeners = [LiveTensorBoard(run_dir(tensorboard, kwargs["out"]))] if tensorboard else []
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        dataset = load_dataset(run.dataset, run.data_dir, run.download)
        if validation_size:
            dataset = split_validation(dataset, validation_size)
        total = run.total_iterations(iterations_per_epoch(dataset, run.batch_size))
        meter = None if quiet else Progress(total)
        sim = Simulator(run, timing, dataset=dataset, out_dir=kwargs.pop("out"),
                        device=kwargs.pop("device"), eval_every=eval_every, log_every=kwargs.pop("log_every"),
                        meter=meter, batched=kwargs.pop("batched"), batch_limit=kwargs.pop("batch_limit"),
                        listeners=listeners, shards=kwargs.pop("shards"))
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    if meter is not None:
        slow = f" ({timing.slow_workers} {timing.slowdown:g}x slower)" if timing.slow_workers else ""
        meter.write(f"ps-sim: {run.algo}, K={run.workers}{slow}, {run.model_name} on {run.dataset}, {total} "
                    f"iterations ({total / sim.iters_per_epoch:g} epochs) on {sim.device}"
                    f"{', batched' if sim.batched else ''}; metrics in {sim.out_dir}")
        meter.update(0)
    try:
        result = sim.simulate()
    finally:
        if meter is not None:
            meter.close()
    click.echo(json.dumps(result.summary | {"out_dir": str(sim.out_dir)}, indent=None))
    if result.summary["diverged"]:
        sys.exit(3)


def _former_slow_flags(kwargs: dict, workers: int) -> None:
    """--slow-fraction F and --slow-factor F, ps-sim's former names, as --slow-workers and --slowdown."""
    fraction, factor = kwargs.pop("slow_fraction"), kwargs.pop("slow_factor")
    if fraction is not None:
        kwargs["slow_workers"] = round(fraction * workers)
        click.echo(f"ps-sim: --slow-fraction is now --slow-workers (here {kwargs['slow_workers']})", err=True)
    if factor is not None:
        kwargs["slowdown"] = factor
        click.echo("ps-sim: --slow-factor is now --slowdown", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-sim")


if __name__ == "__main__":
    main()
