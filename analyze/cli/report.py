"""`trainaudit report RUN`: analyse a run and write report.html, summary.json and tables/*.csv;
`trainaudit report RUN1 RUN2 ...` (or a folder of runs): each run's report plus a comparison page.

`write_full_report` is the library function behind the one-run command (`trainaudit demo` calls it
too); `analyze.pipeline.compare.write_comparison` the one behind several runs.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from loaders.errors import TrainauditError

__all__ = ["report", "write_full_report", "default_out_dir", "ReportFiles"]


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What `write_full_report` wrote. `os.fspath(files)` is the output folder."""

    out_dir: Path
    html: Path
    summary: Path
    tables_dir: Path
    n_data_warnings: int
    result: Any  # analyze.pipeline.analysis.AnalysisResult

    def __fspath__(self) -> str:
        return os.fspath(self.out_dir)


def default_out_dir(run_path: str | os.PathLike[str]) -> Path:
    """RUN/report/ for a folder; <file-stem>-report/ beside a single file."""
    p = Path(run_path)
    return p / "report" if p.is_dir() else p.with_name(f"{p.stem}-report")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainauditError(path, f"cannot create output folder: {(exc.strerror or str(exc)).lower()}") from None


def write_full_report(run_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                      exact_svd: bool | None = None, fmt: str | None = None, model: str | None = None,
                      workers: int | None = None, scheduler: str | None = None,
                      progress: Callable[[str], None] | None = None, config: Any = None) -> ReportFiles:
    """Load `run_path`, analyse it (per-checkpoint results cached in OUT/cache/) and write
    OUT/report.html, OUT/summary.json and OUT/tables/<name>.csv. `workers`: processes for the
    per-checkpoint tasks (None: one per CPU core); `scheduler`: a Dask scheduler address to run
    them on instead. Raises TrainauditError on unreadable input or an unwritable output folder."""
    from analyze.config import AnalysisConfig, default_workers
    from analyze.pipeline.analysis import analyze_run
    from analyze.pipeline.tables import validate_summary
    from loaders.rundir import load_run
    from reports.html import write_report, write_text_atomic

    run_path = Path(run_path)
    if not run_path.exists():
        raise TrainauditError(run_path, "no such file or directory")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_path)
    if config is None:
        config = AnalysisConfig(exact_svd=exact_svd, model_factory=model, scheduler=scheduler,
                                workers=default_workers() if workers is None else workers)
    try:
        run = load_run(run_path, format=fmt)
    except ImportError as exc:  # the foreign-format readers are another module
        raise TrainauditError(run_path, f"not a trainaudit run directory, and the foreign-format readers are "
                                        f"unavailable ({exc})") from None
    _mkdir(out)
    tables_dir = out / "tables"
    _mkdir(tables_dir)
    result = analyze_run(run, config, progress=progress, cache_dir=out / "cache")
    if progress is not None:
        progress("writing tables, summary.json and report.html")
    for name, df in result.tables.items():
        write_text_atomic(tables_dir / f"{name}.csv", df.to_csv(index=False))
    problems = validate_summary(result.summary)
    if problems:  # a bug in trainaudit, not in the user's data
        raise RuntimeError("summary.json does not match format_version 1: " + "; ".join(problems[:5]))
    summary_path = write_text_atomic(out / "summary.json",
                                     json.dumps(result.summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    html = write_report(result, out / "report.html", figure_cache=out / "cache" / "figures")
    return ReportFiles(out, html, summary_path, tables_dir, len(result.data_warnings), result)


@click.command("report")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder [default: RUN/report/ for one run folder, <file>-report/ beside a single "
                   "file; ./trainaudit-compare/ for several runs or a folder of runs].")
@click.option("--exact-svd/--no-exact-svd", "exact_svd", default=None,
              help="Exact SVD beside the spectral estimators [default: on up to ~10M parameters].")
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
def report(runs: tuple[Path, ...], out: Path | None, exact_svd: bool | None, strict: bool, fmt: str | None,
           model: str | None, workers: int | None, scheduler: str | None) -> None:
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
    if len(runs) > 1 or len(paths) > 1 or paths[0] != runs[0]:
        _compare(paths, out, exact_svd=exact_svd, strict=strict, fmt=fmt, model=model, workers=workers,
                 scheduler=scheduler, progress=progress)
        return
    run = runs[0]
    try:
        files = write_full_report(run, out, exact_svd=exact_svd, fmt=fmt, model=model, workers=workers,
                                  scheduler=scheduler, progress=progress)
    except TrainauditError as exc:
        click.echo(f"trainaudit: error: {exc}", err=True)
        raise click.exceptions.Exit(2) from None
    res = files.result
    counts = {s: sum(1 for f in res.findings if str(f.severity) == s) for s in ("error", "warning", "info")}
    click.echo(f"report: {files.html}")
    click.echo(f"summary: {files.summary} ({counts['error']} error(s), {counts['warning']} warning(s), "
               f"{counts['info']} note(s))")
    if files.n_data_warnings:
        click.echo(f"{files.n_data_warnings} data warning(s): see 'Data issues' in the report", err=True)
        if strict:
            click.echo(f"trainaudit: error: {run}: {files.n_data_warnings} data warning(s) (--strict)", err=True)
            raise click.exceptions.Exit(2)


def _compare(paths: list[Path], out: Path | None, *, strict: bool, progress: Callable[[str], None],
             **options: Any) -> None:
    from analyze.pipeline.compare import write_comparison

    try:
        files = write_comparison(paths, out, progress=progress, **options)
    except TrainauditError as exc:
        click.echo(f"trainaudit: error: {exc}", err=True)
        raise click.exceptions.Exit(2) from None
    ok = [r for r in files.rows if r.ok]
    click.echo(f"comparison: {files.html} ({len(ok)} of {len(files.rows)} run(s) analysed)")
    click.echo(f"summary: {files.json}")
    for r in files.rows:
        if not r.ok:
            click.echo(f"trainaudit: error: {r.error}", err=True)
    n_warn = sum(r.data_warnings for r in ok)
    if n_warn:
        click.echo(f"{n_warn} data warning(s) across the runs: see 'Data issues' in each report", err=True)
    if len(ok) < len(files.rows) or (strict and n_warn):
        if strict and n_warn:
            click.echo(f"trainaudit: error: {n_warn} data warning(s) (--strict)", err=True)
        raise click.exceptions.Exit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(report())
