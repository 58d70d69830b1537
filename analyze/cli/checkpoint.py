"""`trainaudit audit` and `trainaudit spectral`: single-checkpoint commands for CI and validation.

Exit codes: 0 healthy, 1 (audit only) a finding at or above ``--fail-on``, 2 unreadable input
(one line on stderr, never a traceback).
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from analyze.cli.errors import Command, fail

__all__ = ["audit", "spectral"]


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


@click.command("audit", cls=Command)
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (summary.json finding shape).")
@click.option("--fail-on", type=click.Choice(["warning", "error"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse exists.")
@click.option("--baseline", type=click.Path(exists=True, path_type=Path), default=None,
              help="Base checkpoint (pretrained model, earlier step): per-tensor relative change, sigma_1 before "
                   "and after, tensors added/removed/reshaped. Any storage layout.")
@click.option("--frozen", multiple=True, metavar="PATTERN",
              help="With --baseline: tensors matching this name pattern (fnmatch, repeatable) must not have moved "
                   "(error frozen_moved).")
@click.option("--verbose", "-v", is_flag=True, help="List the info findings too (the text view summarises them).")
@click.option("--eval-data", "eval_data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Also run the model on this evaluation data (text, JSONL, val.bin, eval_set.safetensors; as "
                   "for `report`): dead FFN units, dead heads, attention logits, rho and, with classes, tau.")
@click.option("--classes", "classes", default=None, metavar="A,B",
              help="Class pair for tau with a JSONL --eval-data [default: the first two classes seen].")
def audit(checkpoint: Path, as_json: bool, fail_on: str, baseline: Path | None, frozen: tuple[str, ...],
          verbose: bool, eval_data: Path | None = None, classes: str | None = None) -> None:
    """Health-check one checkpoint: non-finite or exploding tensors, dead units (all-zero rows or
    columns), layers whose norms stand out from their siblings, spectral norms, stable rank.

    CHECKPOINT is a .safetensors / .pt / .pth / .bin / .ckpt file or a Hugging Face model
    folder (sharded or not). Exit 0 when healthy, 1 when a finding at or above --fail-on
    exists, 2 when the input cannot be read. The same file gives the same output every run.
    """
    from analyze.pipeline.audit import audit_checkpoint, fails

    if frozen and baseline is None:
        raise click.UsageError("--frozen needs --baseline")
    result = audit_checkpoint(checkpoint, baseline=baseline, frozen=frozen)
    pass_lines: list[str] = []
    if eval_data is not None and result.error is None:
        from dataclasses import replace

        from analyze.cli.report import class_pair
        from analyze.config import AnalysisConfig
        from analyze.pipeline.probe_task import audit_model_pass

        extra, pass_lines = audit_model_pass(checkpoint, AnalysisConfig(eval_data=str(eval_data.resolve()),
                                                                         class_pair=class_pair(classes)))
        result = replace(result, findings=tuple(result.findings) + tuple(extra))
    elif classes is not None:
        raise click.UsageError("--classes needs --eval-data")
    if as_json:
        click.echo(json.dumps([f.to_json() for f in result.findings], indent=2, allow_nan=False, sort_keys=True))
    else:
        _print_audit(checkpoint, result, verbose)
        for line in pass_lines:
            click.echo(f"  {line}")
    if result.error is not None:
        fail(result.error)
    sys.exit(1 if fails(result, fail_on) else 0)


def _print_audit(checkpoint: Path, result: Any, verbose: bool) -> None:
    """Every error and warning, then one line summing up the info findings (all with --verbose)."""
    counts = {s: sum(f.severity == s for f in result.findings) for s in ("error", "warning", "info")}
    click.echo(f"{checkpoint}: {len(result.tensors)} tensors, {result.n_params:,} parameters"
               + (f", step {result.step}" if result.step is not None else "")
               + (f", against {result.baseline}" if result.baseline is not None else ""))
    for f in result.findings:
        if f.severity != "info" or verbose or f.code == "moved_most":
            click.echo(f"  {f.severity.upper():7s} {f.code:20s} {f.message}")
    if counts["info"] and not verbose:
        by_code = Counter(f.code for f in result.findings if f.severity == "info")
        kinds = ", ".join(f"{n} {code}" for code, n in sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0])))
        click.echo(f"  {counts['info']} info findings ({kinds}): --verbose lists them, --json gives every value")
    click.echo(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")


@click.command("spectral", cls=Command)
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--exact", is_flag=True, help="Also compute the exact sigma_1 (and sigma_2) for comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per matrix.")
@click.option("--method", type=click.Choice(["auto", "lanczos", "exact"]), default="auto", show_default=True,
              help="Default estimator: Golub-Kahan-Lanczos with an error bound, or exact for small matrices.")
@click.option("--tol", type=click.FloatRange(min=1e-12, max=0.5), default=None,
              help="Stopping tolerance for both methods (default: 1e-5 estimator bound, 1e-4 power iteration).")
def spectral(checkpoint: Path, exact: bool, as_json: bool, method: str, tol: float | None) -> None:
    """Spectral norm of every 2-D (or reshaped N-d) tensor of one checkpoint (§4).

    Shows the default estimate with its relative error bound, the sheet's power iteration,
    and with --exact the exact value and both relative errors.
    """
    from analyze.pipeline.audit import spectral_rows

    rows, warnings = spectral_rows(checkpoint, exact=exact, method=method, tol=tol)
    for w in warnings:
        click.echo(f"trainaudit: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2, allow_nan=False))
        return
    if not rows:
        click.echo(f"{checkpoint}: no 2-D tensors")
        return
    width = min(max(len(r.tensor) for r in rows), 60)
    head = (f"{'tensor':{width}s} {'shape':>14s} {'method':8s} {'sigma_est':>11s} {'bound':>8s} "
            f"{'sigma_power':>11s} {'iters':>5s}")
    if exact:
        head += f" {'sigma_exact':>11s} {'rel_err':>8s} {'pow_err':>8s} {'s2/s1':>6s}"
    click.echo(head)
    for r in rows:
        name = r.tensor if len(r.tensor) <= width else "..." + r.tensor[-(width - 3):]
        line = (f"{name:{width}s} {'x'.join(map(str, r.shape)):>14s} {r.method:8s} {_fmt(r.sigma_est):>11s} "
                f"{_fmt(r.err_bound, '.1e'):>8s} {_fmt(r.sigma_power):>11s} "
                f"{'-' if r.iterations is None else r.iterations:>5}")
        if exact:
            line += (f" {_fmt(r.sigma_exact):>11s} {_fmt(r.rel_err, '.1e'):>8s} {_fmt(r.power_rel_err, '.1e'):>8s}"
                     f" {_fmt(r.sigma_ratio, '.3f'):>6s}")
        click.echo(line)
