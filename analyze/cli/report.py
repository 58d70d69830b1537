"""`trainaudit report RUN`: analyse a run and write report.html, summary.json and tables/*.csv;
`trainaudit report RUN1 RUN2 ...` (or a folder of runs): each run's report plus a comparison page.

The library functions behind them: `analyze.pipeline.output.write_full_report` (one run) and
`analyze.pipeline.compare.write_comparison` (several runs).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from analyze.cli.errors import Command, fail, say_error

__all__ = ["report"]


@click.command("report", cls=Command)
@click.argument("runs", nargs=-1, required=True, metavar="RUN...", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder [default: RUN/report/ for one run folder, <file>-report/ beside a single "
                   "file; ./trainaudit-compare/ for several runs or a folder of runs].")
@click.option("--exact-svd/--no-exact-svd", "exact_svd", default=None,
              help="Exact SVD beside the spectral estimators, for the validation table [default: on up to ~10M parameters]. Matrices with min dimension <= 128 always get it: there it costs less than the estimator.")
@click.option("--strict", is_flag=True, help="Exit 2 when the run's files had any data warning (after writing).")
@click.option("--format", "fmt", default=None, metavar="NAME",
              help="Read RUN as this format instead of detecting it.")
@click.option("--model", "model", default=None, metavar="MODULE:FUNCTION",
              help="Your own model factory for the activation panels (called with the run's model config).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Worker processes for the per-checkpoint tasks (1: all in this process) "
                   "[default: number of CPU cores].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the per-checkpoint tasks on this Dask scheduler (e.g. tcp://host:8786) instead of "
                   "local processes; needs pip install 'trainaudit[dask]', and every worker must see the "
                   "run's files at the same paths.")
@click.option("--eval-data", "eval_data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Evaluation data for the model panels of a run from another library: a text file (one example "
                   "per line, tokenised by the checkpoint's own tokenizer), JSONL (text, optional class), nanoGPT "
                   "val.bin or eval_set.safetensors; at most 256 sequences of 128 tokens, seed 0.")
@click.option("--classes", "classes", default=None, metavar="A,B",
              help="Class pair for tau = L(A) - L(B) with a JSONL --eval-data [default: the first two classes seen].")
def report(runs: tuple[Path, ...], out: Path | None, exact_svd: bool | None, strict: bool, fmt: str | None,
           model: str | None, workers: int | None, scheduler: str | None, eval_data: Path | None = None,
           classes: str | None = None) -> None:
    """Analyse RUN (a trainaudit run directory, or any run or log file trainaudit reads) and write
    report.html, summary.json and tables/*.csv. Progress goes to stderr. Exit 0 on success, 2 on
    unreadable input (or, with --strict, on any data warning).

    \b
    Several runs - RUN1 RUN2 ..., or one folder whose sub-folders are runs - are compared: each
    run's full report goes to OUT/runs/NN-<name>/, and OUT/comparison.html (final losses, verdicts,
    divergence steps, tau, spikes and spectral-norm growth side by side, linked to each report)
    and OUT/comparison.json are written next to it. Exit 2 when any run could not be read.
    """
    def progress(msg: str) -> None:
        click.echo(f"  {msg}", err=True)

    from analyze.pipeline.compare import expand_runs

    paths = expand_runs(runs)
    if len(paths) > 1:  # a comparison needs two runs (a folder holding one run is that run)
        if eval_data is not None or classes is not None:
            fail("--eval-data and --classes apply to one run; give one RUN")
        _compare(paths, out, exact_svd=exact_svd, strict=strict, fmt=fmt, model=model, workers=workers,
                 scheduler=scheduler, progress=progress)
        return
    from analyze.pipeline.output import write_full_report

    run = paths[0]
    config = None
    if eval_data is not None or classes is not None:
        from analyze.config import AnalysisConfig, default_workers

        config = AnalysisConfig(exact_svd=exact_svd, model_factory=model, scheduler=scheduler,
                                workers=default_workers() if workers is None else workers,
                                eval_data=None if eval_data is None else str(eval_data.resolve()),
                                class_pair=class_pair(classes))
    files = write_full_report(run, out, exact_svd=exact_svd, fmt=fmt, model=model, workers=workers,
                              scheduler=scheduler, progress=progress, config=config)
    res = files.result
    counts = res.summary["finding_counts"]  # the counts summary.json holds ("N more" rows count N)
    click.echo(f"report: {files.html}")
    click.echo(f"summary: {files.summary} (findings: {counts['error']} error(s), {counts['warning']} warning(s), "
               f"{counts['info']} info)")
    if files.n_data_warnings:
        click.echo(f"{files.n_data_warnings} data warning(s): see 'Data issues' in the report", err=True)
        if strict:
            fail(f"{run}: {files.n_data_warnings} data warning(s) (--strict)")


def class_pair(classes: str | None) -> tuple[str, str] | None:
    """`--classes A,B` as (A, B); exit 2 on anything else."""
    if classes is None:
        return None
    parts = [c.strip() for c in classes.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        fail(f"--classes must be two different class names A,B, got {classes!r}")
    return parts[0], parts[1]


def _compare(paths: list[Path], out: Path | None, *, strict: bool, progress: Callable[[str], None],
             **options: Any) -> None:
    from analyze.pipeline.compare import write_comparison

    files = write_comparison(paths, out, progress=progress, **options)
    ok = [r for r in files.rows if r.ok]
    click.echo(f"comparison: {files.html} ({len(ok)} of {len(files.rows)} run(s) analysed)")
    click.echo(f"summary: {files.json}")
    for r in files.rows:
        if not r.ok:
            say_error(r.error)
    n_warn = sum(r.data_warnings for r in ok)
    if n_warn:
        click.echo(f"{n_warn} data warning(s) across the runs: see 'Data issues' in each report", err=True)
    if len(ok) < len(files.rows) or (strict and n_warn):
        if strict and n_warn:
            fail(f"{n_warn} data warning(s) (--strict)")
        raise click.exceptions.Exit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(report())
