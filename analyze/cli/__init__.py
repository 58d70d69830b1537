"""The `trainaudit` command line (also `python -m analyze`). Thin: each command parses its
options, calls one library function and prints. Commands are imported lazily so `--help`
is fast and a command's heavy imports happen only when it runs.

Any TrainauditError (a problem with the user's files) ends as one line on stderr and exit
code 2, never a traceback (`analyze.cli.errors`, used by every command and the group).
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import sys

import click

from analyze.cli.errors import ErrorsExit2

# At exit, interpreter shutdown would walk every object torch's import made (0.3-0.45 s of every
# command here); frozen objects are skipped. Files, atexit hooks and destructors run as usual.
atexit.register(gc.freeze)

M_TOP_PAD = -2             # glibc mallopt parameter: bytes kept past the heap top
HEAP_TOP_PAD = 64 << 20


def keep_freed_heap() -> None:
    """Let this process keep up to 64 MiB of freed heap instead of handing it back to the OS at
    once. Parsing a big log allocates and frees megabytes per block; with glibc's default every
    block faults fresh pages in again (a third of a 2M-line report's system time). Peak memory is
    unchanged. Does nothing where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_TOP_PAD, HEAP_TOP_PAD)


# name -> "module:attribute" of the click command
COMMANDS = {
    "demo": "analyze.cli.demo:demo",
    "report": "analyze.cli.report:report",
    "audit": "analyze.cli.checkpoint:audit",
    "spectral": "analyze.cli.checkpoint:spectral",
}
SHORT_HELP = {
    "demo": "Train the built-in MiniGPT demo with the logger, then write its report.",
    "report": "Analyse a run (ours or a foreign one) and write report.html + summary.json.",
    "audit": "Health-check one checkpoint (exit 1 on findings, for CI).",
    "spectral": "Spectral norms of one checkpoint's matrices, with error bounds.",
}


class LazyGroup(ErrorsExit2, click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, SHORT_HELP[n]) for n in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainaudit", message="trainaudit %(version)s")
def main() -> None:
    """trainaudit: audit neural-network training runs after the fact.

    \b
    The in-loop logger (`from loaders import RunLogger`) writes a run directory; the
    commands below reload it - or a Hugging Face Trainer, Lightning, TensorBoard, nanoGPT or
    llm.c run - recompute the health metrics and write one self-contained HTML report.

    \b
    Quick start:
      trainaudit demo                  train the built-in demo and report on it
      trainaudit report RUN_DIR        report on any run
      trainaudit audit model.safetensors --fail-on error
    """
    keep_freed_heap()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
