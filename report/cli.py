"""`ps-plot`: figures (PNG) and paper-format tables (markdown) from runs of ps-sim, ps-server or ps-launch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ormo_ps.common.cli_options import run_cli
from ormo_ps.report.plots import write_figures
from ormo_ps.report.runs import find_runs
from ormo_ps.report.tables import paper_table
from ormo_ps.report.tensorboard import export


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="runs/report",
              help="Where the PNG figures and report.md go.", allow_from_autoenv=False)
@click.option("--title", default="Results", help="Heading of report.md.", allow_from_autoenv=False)
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None,
              allow_from_autoenv=False,
              help="Also write TensorBoard event files here, one folder per run (tensorboard --logdir DIR).")
def cli(paths: tuple[Path, ...], out_dir: Path, title: str, tensorboard: Path | None) -> None:
    """Plot test accuracy and training loss against epochs and time, and tabulate final results.

    PATHS are run directories (holding metrics.jsonl) or folders searched for them; runs that differ only in
    their seed are averaged (a method whose runs differ in more, such as simulator and service runs, gets one
    row and line per configuration).
    """
    try:
        runs = find_runs(list(paths))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if tensorboard is not None:
        try:
            folders = export(runs, tensorboard)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"ps-plot: TensorBoard event files of {len(folders)} run(s) in {tensorboard}", err=True)
    figures = write_figures(runs, out_dir, warn=lambda m: click.echo(f"ps-plot: warning: {m}", err=True))
    report = "\n".join([
        f"# {title}", "", f"{len(runs)} runs from {', '.join(map(str, paths))}.", "",
        "## Test accuracy (%)", "", paper_table(runs, "test_accuracy"), "",
        "## Final training loss", "", paper_table(runs, "train_loss"), "",
        "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures], ""])
    (out_dir / "report.md").write_text(report)
    click.echo(report)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(cli, argv, "ps-plot")


if __name__ == "__main__":
    main()
