"""`ps-plot`: figures (PNG) and paper-format tables (markdown) from runs of ps-sim, ps-server or ps-launch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from common.cli_options import run_cli
from report.plots import write_figures
from report.runs import find_runs
from report.tables import paper_table


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="runs/report",
              help="Where the PNG figures and report.md go.", allow_from_autoenv=False)
@click.option("--title", default="Results", help="Heading of report.md.", allow_from_autoenv=False)
def cli(paths: tuple[Path, ...], out_dir: Path, title: str) -> None:
    """Plot test accuracy and training loss against epochs and time, and tabulate final results.

    PATHS are run directories (holding metrics.jsonl) or folders searched for them; runs with the same
    algorithm, K and setting (hom./het.) are seeds of one cell.
    """
    try:
        runs = find_runs(list(paths))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    figures = write_figures(runs, out_dir)
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
