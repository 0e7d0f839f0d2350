"""`ps-eval`: the evaluator. It pulls parameters over the unary call and measures test accuracy.

It runs beside the server and the workers, so evaluation never stalls training: every `--eval-every`
epochs (by the server's count) it fetches the current parameters, recomputes BatchNorm statistics at them
and evaluates on the test set, appending `eval` records to the same JSON-lines metrics as the server. When
the server reports the run done, it evaluates the final parameters once more and exits.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import click
import grpc

from ormo_ps.common.cli_options import client_metrics, client_process_options, run_cli, setup_client_process
from ormo_ps.common.codec import decode
from ormo_ps.common.data import load_dataset
from ormo_ps.common.grpc_options import GRPC_OPTIONS
from ormo_ps.common.live_tensorboard import LiveTensorBoard, run_dir
from ormo_ps.common.live_tensorboard import check as check_tensorboard
from ormo_ps.common.evaluation import Evaluator
from ormo_ps.common.metrics import MetricsWriter, describe_eval, write_eval
from ormo_ps.common.models import FROM_CLIENT, FlatModel, build_model
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.security import ClientSecurity
from ormo_ps.worker.cli import model_options
from ormo_ps.worker.prom_metrics import EvalMeters

logger = logging.getLogger(__name__)


def run_evaluator(server: str, *, data_dir: str | None = None, out_dir: Path | None = None,
                  eval_every: float = 1.0, poll: float = 1.0, server_timeout: float = 60.0,
                  rpc_timeout: float = 60.0, device: str = "cpu",
                  security: ClientSecurity = ClientSecurity(), model: str | None = None,
                  dataset: str | None = None, meters: EvalMeters | None = None,
                  tensorboard: Path | None = None) -> dict | None:
    """Evaluate until the run is done; returns the last eval record (None if the server never answered).
    `model` and `dataset` (names or import paths) stand for those the server names; `meters` (Prometheus)
    take each eval record's values, and TensorBoard events of them go to `tensorboard`/<out_dir's name>/eval
    as they are written (common/live_tensorboard.py)."""
    if tensorboard is not None and out_dir is None:
        raise ValueError("--tensorboard writes what metrics.jsonl holds: it needs --out")
    if tensorboard is not None:
        check_tensorboard(tensorboard)  # (its own words name the directory given)
    listeners = [LiveTensorBoard(run_dir(tensorboard, out_dir, "eval"))] if tensorboard is not None else []
    metrics = MetricsWriter(out_dir / "metrics.jsonl", mode="a", listeners=listeners) if out_dir else None
    evaluator: Evaluator | None = None
    next_eval = eval_every if eval_every > 0 else math.inf
    last_record: dict | None = None
    last_seen = time.monotonic()
    try:
        metadata = security.call_metadata()
        with security.channel(server, GRPC_OPTIONS) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            while True:
                try:
                    status = stub.GetStatus(pb.GetStatusRequest(), timeout=rpc_timeout, metadata=metadata)
                except grpc.RpcError as e:
                    if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        raise ValueError(f"the server refused the evaluator: {e.details()}") from None
                    if time.monotonic() - last_seen > server_timeout:
                        logger.warning("server unreachable for %.0fs (%s); stopping", server_timeout, e.code().name)
                        return last_record
                    time.sleep(poll)
                    continue
                last_seen = time.monotonic()
                if evaluator is None:  # at once, not when the first evaluation is due: the run may end meanwhile
                    cfg = status.config
                    model = model or cfg.model
                    if model == FROM_CLIENT:
                        raise ValueError(f"the server names no model (--model {FROM_CLIENT}: its clients bring "
                                         "their own); give ps-eval --model (and --dataset)")
                    data = load_dataset(dataset or cfg.dataset, data_dir)
                    flat = FlatModel(build_model(model, data.num_classes, data.input_shape), device=device)
                    evaluator = Evaluator(flat, data, seed=cfg.seed)
                    continue  # poll again: loading may have taken a while
                due = status.done or status.epoch >= next_eval
                if due and (last_record is None or last_record["iteration"] != status.iteration or status.done):
                    try:
                        params = stub.GetParameters(pb.GetParametersRequest(), timeout=rpc_timeout,
                                                    metadata=metadata)
                    except grpc.RpcError as e:
                        logger.warning("GetParameters failed: %s", e.code().name)
                        time.sleep(poll)
                        continue
                    if last_record is None or last_record["iteration"] != params.iteration_index:
                        logger.info("evaluating the parameters of iteration %d%s", params.iteration_index,
                                    " (the final ones)" if status.done else "")
                        began = time.monotonic()
                        result = evaluator(decode(params.tensor, expected_numel=evaluator.model.numel))
                        train_loss = status.train_loss if math.isfinite(status.train_loss) else None
                        last_record = write_eval(metrics, params.iteration_index, params.epoch,
                                                 status.uptime_seconds, train_loss, result)
                        if meters is not None:
                            meters.evaluated(last_record, time.monotonic() - began)
                        logger.info("%s", describe_eval(last_record))
                    while next_eval <= status.epoch:
                        next_eval += eval_every
                if status.done:
                    return last_record
                time.sleep(poll)
    finally:
        if metrics:
            metrics.close()


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--server", default="127.0.0.1:50051", help="The parameter server's HOST:PORT.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Where the test set is.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Append eval records to OUT/metrics.jsonl.")
@click.option("--eval-every", type=click.FloatRange(min=0), default=1.0, help="Epochs between evaluations (0: end only).")
@click.option("--poll", type=click.FloatRange(min=0.05), default=1.0, help="Seconds between status polls.")
@click.option("--tensorboard", type=click.Path(), default=None, metavar="DIRECTORY",
              help="Write the eval records as TensorBoard events as they are written, into DIRECTORY/<--out's "
                   "name>/eval (ps-server --tensorboard DIRECTORY writes the progress into DIRECTORY/<--out's name>). "
                   "Needs --out.")
@model_options
@client_process_options
def cli(**kw) -> None:
    """Evaluate a running server's parameters every few epochs and at the end."""
    security = setup_client_process(kw)
    registry, endpoint = client_metrics(kw, "ps-eval")
    try:
        record = run_evaluator(kw["server"], data_dir=kw["data_dir"],
                               out_dir=Path(kw["out"]) if kw["out"] else None, eval_every=kw["eval_every"],
                               poll=kw["poll"], server_timeout=kw["server_timeout"], device=kw["device"],
                               security=security, model=kw["model"], dataset=kw["dataset"],
                               meters=EvalMeters(registry) if registry else None,
                               tensorboard=Path(kw["tensorboard"]) if kw["tensorboard"] else None)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if endpoint is not None:
            endpoint.close()
    click.echo(json.dumps(record))
    if record is None:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-eval")


if __name__ == "__main__":
    main()
