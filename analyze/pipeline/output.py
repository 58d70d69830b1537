"""A run's report folder on disk: OUT/report.html, OUT/summary.json and OUT/tables/<name>.csv.

`reports` renders strings and writes nothing; this module writes them, every file through
`loaders.safeio.write_atomic` (a failed write leaves the previous file, never a torn one).
`write_full_report` is the library function behind `trainaudit report RUN` and `trainaudit demo`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.errors import TrainauditError
from loaders.safeio import write_atomic

__all__ = ["ReportFiles", "default_out_dir", "write_full_report", "write_report", "write_comparison_html",
           "write_json", "FigureFolder"]


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


class FigureFolder(MutableMapping[str, str]):
    """The figure cache of `reports` kept in a folder: one `<key>.b64` file per figure. A cache
    that cannot be read or written only costs time, so failures are not errors here."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.b64"

    def __getitem__(self, key: str) -> str:
        try:
            return self._path(key).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            raise KeyError(key) from None

    def __setitem__(self, key: str, uri: str) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(key), uri.encode("ascii"), what="figure cache")
        except (OSError, TrainauditError):
            pass

    def __delitem__(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        if self.folder.is_dir():
            yield from (p.stem for p in self.folder.glob("*.b64"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def default_out_dir(run_path: str | os.PathLike[str]) -> Path:
    """RUN/report/ for a folder; <file-stem>-report/ beside a single file."""
    p = Path(run_path)
    return p / "report" if p.is_dir() else p.with_name(f"{p.stem}-report")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainauditError(path, f"cannot create output folder: {(exc.strerror or str(exc)).lower()}") from None


def _figures(folder: str | os.PathLike[str] | None) -> FigureFolder | None:
    return None if folder is None else FigureFolder(folder)


def write_json(path: str | os.PathLike[str], doc: Any) -> Path:
    """`doc` as indented UTF-8 JSON (NaN refused), written atomically; returns the path."""
    return write_atomic(path, json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n", what="report")


def write_report(result: Any, path: str | os.PathLike[str], run_meta: Mapping[str, Any] | None = None, *,
                 figure_cache: str | os.PathLike[str] | None = None) -> Path:
    """Render `result` (`reports.render_report`) and write it atomically; `figure_cache` is a folder
    for the drawn figures. Returns the path."""
    from reports.html import render_report

    html = render_report(result, run_meta, figure_cache=_figures(figure_cache))
    return write_atomic(path, html, what="report")


def write_comparison_html(rows: Sequence[Any], curves: Any, path: str | os.PathLike[str], *,
                          figure_cache: str | os.PathLike[str] | None = None) -> Path:
    """Render the comparison page (`reports.compare.render_comparison`) and write it atomically."""
    from reports.compare import render_comparison

    html = render_comparison(rows, curves, figure_cache=_figures(figure_cache))
    return write_atomic(path, html, what="report")


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
    from loaders.rundir import load_run
    from loaders.runcache import cached_loader

    run_path = Path(run_path)
    if not run_path.exists():
        raise TrainauditError(run_path, "no such file or directory")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_path)
    if config is None:
        config = AnalysisConfig(exact_svd=exact_svd, model_factory=model, scheduler=scheduler,
                                workers=default_workers() if workers is None else workers)
    try:  # a big log parsed by an earlier report on this folder is read back, not parsed again
        run = cached_loader(lambda: load_run(run_path, format=fmt), run_path, fmt, out / "cache", skip=out)
    except ImportError as exc:  # the foreign-format readers are another module
        raise TrainauditError(run_path, f"not a trainaudit run directory, and the foreign-format readers are "
                                        f"unavailable ({exc})") from None
    _mkdir(out)
    tables_dir = out / "tables"
    _mkdir(tables_dir)
    result = analyze_run(run, config, progress=progress, cache_dir=out / "cache")
    if progress is not None:
        progress("writing tables, summary.json and report.html")
    from analyze.pipeline.cache import write_tables

    write_tables(result.tables, tables_dir, out / "cache")  # an unchanged table is not rewritten
    summary_path = write_json(out / "summary.json", result.summary)
    html = write_report(result, out / "report.html", figure_cache=out / "cache" / "figures")
    return ReportFiles(out, html, summary_path, tables_dir, len(result.data_warnings), result)
