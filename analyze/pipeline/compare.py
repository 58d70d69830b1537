"""Several runs side by side: each run's own report, then one comparison page.

`trainaudit report RUN1 RUN2 ...` (or a folder whose sub-folders are runs) writes, under the
output folder (default ``./trainaudit-compare/``):

    runs/NN-<name>/report.html, summary.json, tables/*.csv, cache/   each run's full report
    comparison.html                                                 the side-by-side page
    comparison.json                                                 the same numbers (format_version 1)

Everything a run contributes is read from its analysis result (tables and summary); nothing
here computes a metric beyond picking first/last values.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyze.config import AnalysisConfig
from analyze.metrics.growth import spectral_growth as growth_of
from analyze.pipeline.tables import finite_or_none, json_safe
from loaders.errors import TrainauditError

__all__ = ["SpectralGrowth", "RunComparison", "ComparisonFiles", "COMPARISON_FORMAT_VERSION",
           "DEFAULT_COMPARE_DIR", "is_run", "runs_in_folder", "expand_runs", "spectral_growth",
           "compare_row", "write_comparison"]

COMPARISON_FORMAT_VERSION = 1
DEFAULT_COMPARE_DIR = Path("trainaudit-compare")
_OUTPUT_MARKERS = ("comparison.json", "summary.json")  # folders trainaudit wrote are not runs


@dataclass(frozen=True, slots=True)
class SpectralGrowth:
    """The run's largest sigma_1 growth (`analyze.metrics.growth`: mid-run reference checkpoint
    `first_step` to the last, §4, §12) and the threshold the findings hold it against."""

    ratio: float
    tensor: str
    first_step: int
    last_step: int
    sigma_first: float
    sigma_last: float
    threshold: float

    @property
    def flagged(self) -> bool:
        """Above `AnalysisConfig.spectral_growth`: the run has a spectral_growth finding."""
        return self.ratio > self.threshold

    def to_json(self) -> dict[str, Any]:
        return json_safe({"max_ratio": self.ratio, "tensor": self.tensor, "first_step": self.first_step,
                          "last_step": self.last_step, "sigma_first": self.sigma_first,
                          "sigma_last": self.sigma_last, "threshold": self.threshold, "flagged": self.flagged})


@dataclass(frozen=True, slots=True)
class RunComparison:
    """One row of the comparison: a run's headline numbers and where its report is."""

    name: str
    path: str
    folder: str                      # runs/NN-<name>, relative to the comparison page
    error: str = ""                  # the run could not be read or analysed
    source_format: str | None = None
    steps_logged: int | None = None
    checkpoints: int = 0
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_eval_step: int | None = None
    best_val_loss: float | None = None
    val_series: str | None = None
    verdict: str | None = None
    divergence_step: int | None = None
    val_min_step: int | None = None
    gl5_step: int | None = None
    tau: dict[str, Any] | None = None
    loss_spikes: int = 0
    grad_norm_spikes: int = 0
    non_finite: int = 0
    growth: SpectralGrowth | None = None
    errors: int = 0
    warnings: int = 0
    infos: int = 0
    data_warnings: int = 0

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        ok = self.ok
        return json_safe({
            "name": self.name, "path": self.path, "status": "ok" if ok else "error", "error": self.error or None,
            "report": f"{self.folder}/report.html" if ok else None,
            "summary": f"{self.folder}/summary.json" if ok else None,
            "source_format": self.source_format, "steps_logged": self.steps_logged,
            "checkpoints": self.checkpoints, "final_train_loss": self.final_train_loss,
            "final_val_loss": self.final_val_loss, "final_eval_step": self.final_eval_step,
            "best_val_loss": self.best_val_loss, "val_series": self.val_series, "verdict": self.verdict,
            "divergence_step": self.divergence_step, "val_min_step": self.val_min_step,
            "gl5_step": self.gl5_step, "tau": self.tau,
            "spikes": {"loss": self.loss_spikes, "grad_norm": self.grad_norm_spikes, "non_finite": self.non_finite},
            "spectral_growth": None if self.growth is None else self.growth.to_json(),
            "findings": {"error": self.errors, "warning": self.warnings, "info": self.infos},
            "data_warnings": self.data_warnings})


@dataclass(frozen=True, slots=True)
class ComparisonFiles:
    """What `write_comparison` wrote."""

    out_dir: Path
    html: Path
    json: Path
    rows: tuple[RunComparison, ...]

    def __fspath__(self) -> str:
        return os.fspath(self.out_dir)


# --------------------------------------------------------------------------- finding the runs


def _is_output(path: Path) -> bool:
    """A folder trainaudit wrote (a report or a comparison): never a run."""
    return path.is_dir() and any((path / m).is_file() for m in _OUTPUT_MARKERS)


def is_run(path: Path) -> bool:
    """True when the loaders' detector recognises `path` and it is not a trainaudit output folder."""
    from loaders.detect import is_run as loader_recognises

    return not _is_output(path) and loader_recognises(path)


def runs_in_folder(folder: Path) -> list[Path]:
    """The immediate sub-folders of `folder` that are runs, by name ([] when `folder` is a run)."""
    if not folder.is_dir() or _is_output(folder) or is_run(folder):
        return []
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in subs if is_run(p)]


def expand_runs(paths: Sequence[Path]) -> list[Path]:
    """Each argument that is a folder of runs becomes its runs; anything else stays (and fails
    later with the loader's own message if it is not readable). A folder holding one run becomes
    that run, so one run never makes a comparison page (a comparison needs two runs)."""
    out: list[Path] = []
    for p in paths:
        inner = runs_in_folder(Path(p))
        out.extend(inner if inner else [Path(p)])
    return list(dict.fromkeys(out))


def _slug(path: Path, index: int) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.resolve().name.lower()).strip("-.")[:40] or "run"
    return f"runs/{index:02d}-{name}"


# --------------------------------------------------------------------------- one row


def spectral_growth(spectral: pd.DataFrame, cfg: AnalysisConfig | None = None) -> SpectralGrowth | None:
    """The largest sigma_1 growth over the matrices of the spectral table (`analyze.metrics.growth`,
    the definition the findings use); None with fewer than two checkpoints."""
    g = growth_of(spectral)
    if g is None or g.ratio.empty:
        return None
    name = str(g.ratio.idxmax())
    return SpectralGrowth(float(g.ratio.max()), name, g.ref_step, g.last_step, float(g.sigma_ref[name]),
                          float(g.sigma_last[name]), (cfg or AnalysisConfig()).spectral_growth)


def compare_row(result: Any, path: Path, folder: str, cfg: AnalysisConfig | None = None) -> RunComparison:
    """The comparison row of one analysed run (an AnalysisResult) under the thresholds of `cfg`
    (default: `AnalysisConfig()`)."""
    s = result.summary
    of = s.get("overfitting") or {}
    T = result.tables
    ot = T["overfitting"]
    final_train = final_val = best_val = None
    final_step = None
    if len(ot):
        last = ot.iloc[-1]
        final_train, final_val = finite_or_none(last["train_loss"]), finite_or_none(last["val_loss"])
        final_step = int(last["step"])
        best_val = finite_or_none(pd.to_numeric(ot["val_loss"], errors="coerce").min())
    else:  # no validation series: the last logged training loss
        loss = T["train"][T["train"]["series"] == "loss"]
        if len(loss):
            final_train = finite_or_none(loss.sort_values("step")["value"].iloc[-1])
    spikes = T["spikes"]
    kinds = spikes.groupby(["series", "kind"]).size() if len(spikes) else pd.Series(dtype=int)
    count = {s: {"spike": int(kinds.get((s, "spike"), 0)), "non-finite": int(kinds.get((s, "non-finite"), 0))}
             for s in ("loss", "grad_norm")}
    sev = [str(f.severity) for f in result.findings]
    run = s.get("run") or {}
    return RunComparison(
        name=str(run.get("name", path.name)), path=str(path), folder=folder,
        source_format=run.get("source_format"), steps_logged=run.get("steps_logged"),
        checkpoints=len(run.get("checkpoints") or []), final_train_loss=final_train, final_val_loss=final_val,
        final_eval_step=final_step, best_val_loss=best_val, val_series=of.get("val_series"),
        verdict=of.get("verdict"), divergence_step=of.get("divergence_step"), val_min_step=of.get("val_min_step"),
        gl5_step=of.get("gl5_step"), tau=s.get("tau"), loss_spikes=count["loss"]["spike"],
        grad_norm_spikes=count["grad_norm"]["spike"],
        non_finite=count["loss"]["non-finite"] + count["grad_norm"]["non-finite"],
        growth=spectral_growth(T["spectral"], cfg), errors=sev.count("error"), warnings=sev.count("warning"),
        infos=sev.count("info"), data_warnings=len(result.data_warnings))


def _curves(result: Any, name: str) -> list[pd.DataFrame]:
    """Training loss and the chosen validation series of one run, for the overlay figure."""
    T = result.tables
    parts = []
    loss = T["train"][T["train"]["series"] == "loss"]
    if len(loss):
        parts.append(pd.DataFrame({"run": name, "curve": "train", "step": loss["step"].to_numpy(),
                                   "value": pd.to_numeric(loss["value"], errors="coerce").to_numpy(float)}))
    ot = T["overfitting"]
    if len(ot):
        parts.append(pd.DataFrame({"run": name, "curve": "val", "step": ot["step"].to_numpy(),
                                   "value": pd.to_numeric(ot["val_loss"], errors="coerce").to_numpy(float)}))
    return parts


# --------------------------------------------------------------------------- all runs


def write_comparison(paths: Sequence[Path], out_dir: str | os.PathLike[str] | None = None, *,
                     exact_svd: bool | None = None, fmt: str | None = None, model: str | None = None,
                     workers: int | None = None, scheduler: str | None = None,
                     progress: Callable[[str], None] | None = None) -> ComparisonFiles:
    """Write each run's full report under OUT/runs/NN-<name>/ and the comparison page and JSON in
    OUT (default ./trainaudit-compare/). A run that cannot be read becomes a row with its error;
    the others are still compared. Per-run caches make a second call recompute nothing."""
    from analyze.pipeline.output import write_comparison_html, write_full_report, write_json

    out = Path(out_dir) if out_dir is not None else DEFAULT_COMPARE_DIR
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainauditError(out, f"cannot create output folder: {(exc.strerror or str(exc)).lower()}") from None
    rows: list[RunComparison] = []
    curves: list[pd.DataFrame] = []
    for i, path in enumerate(paths, 1):
        folder = _slug(Path(path), i)
        tag = f"[{i}/{len(paths)} {Path(path).name}]"

        def say(msg: str, tag: str = tag) -> None:
            if progress is not None:
                progress(f"{tag} {msg}")

        say("analysing")
        try:
            files = write_full_report(path, out / folder, exact_svd=exact_svd, fmt=fmt, model=model,
                                      workers=workers, scheduler=scheduler, progress=say)
        except TrainauditError as exc:
            say(f"skipped: {exc}")
            rows.append(RunComparison(name=Path(path).name, path=str(path), folder=folder, error=str(exc)))
            continue
        rows.append(compare_row(files.result, Path(path), folder))
        curves.extend(_curves(files.result, f"{i:02d} {rows[-1].name}"))
    doc = {"format_version": COMPARISON_FORMAT_VERSION, "runs": [r.to_json() for r in rows]}
    json_path = write_json(out / "comparison.json", doc)
    table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["run", "curve", "step", "value"])
    html = write_comparison_html(rows, table, out / "comparison.html", figure_cache=out / "cache" / "figures")
    return ComparisonFiles(out, html, json_path, tuple(rows))
