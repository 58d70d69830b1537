"""`trainaudit demo`: train MiniGPT on the verb corpus with the logger, then report."""
from __future__ import annotations

from pathlib import Path

import click

from analyze.cli.errors import Command


@click.command(cls=Command)
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1),
              help="Optimizer steps to train.")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run directory to write (an existing run there is replaced).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for init and batches.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write the HTML report when training ends.")
def demo(steps: int, out: str, seed: int, report: bool) -> None:
    """Train the ~103k-parameter MiniGPT on the verb-tense corpus (regular vs irregular
    verbs) on the CPU, logging with RunLogger (eval every 50 steps, checkpoint every 100),
    then write the report into OUT/report/."""
    import shutil

    import torch

    from analyze.demo import corpus
    from analyze.demo.model import MiniGPT, MiniGPTConfig
    from analyze.demo.train import DemoSettings, train_demo

    run = Path(out)
    if run.exists():
        if not (run / "run.json").exists():
            raise click.UsageError(f"{run} exists and is not a trainaudit run; choose another --out")
        shutil.rmtree(run)
    n = MiniGPT(MiniGPTConfig(vocab_size=len(corpus.vocabulary()), context=corpus.CONTEXT)).num_parameters()
    click.echo(f"MiniGPT: {n:,} parameters; training {steps} steps on {torch.get_num_threads()} CPU threads")

    def progress(step: int, total: int, elapsed: float) -> None:
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / rate if rate > 0 else 0.0
        click.echo(f"  step {step:>5}/{total}  {elapsed:6.1f}s elapsed  ~{eta:5.0f}s left", err=True)

    train_demo(run, DemoSettings(steps=steps, seed=seed), progress=progress)
    click.echo(f"run written to {run}")
    if report:
        from analyze.pipeline.output import write_full_report

        files = write_full_report(run, run / "report")
        click.echo(f"report: {files.html}")
