"""A RunLogger closed by `__del__` or at interpreter exit: a flush that fails (a full disk,
simulated by pointing the log files at /dev/full) is reported on stderr in one line naming the
run directory and the records lost; a flush that works stays silent and keeps every record."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loaders import RunLogger, load_run

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (ENOSPC on write)")


def _fill(log: RunLogger) -> None:
    for step in range(3):
        log.log_step(step, loss=1.0 + step)
    for step in range(2):
        log.log_class_losses(step, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


def _disk_full(log: RunLogger) -> None:
    """Every log file of the logger now fails to write with ENOSPC, as on a full disk."""
    for key, fd in log._fds.items():
        os.close(fd)
        log._fds[key] = os.open("/dev/full", os.O_WRONLY)


def test_dropped_logger_that_cannot_flush_says_so_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=100, fsync=False)
    _fill(log)
    _disk_full(log)
    del log
    gc.collect()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert str(tmp_path / "r") in err[0] and "dropped without close()" in err[0]
    assert "3 step record(s) and 2 per-class batch(es) not written" in err[0] and "OSError" in err[0]


def test_dropped_logger_that_can_flush_is_silent_and_keeps_its_records(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    log = RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=100, fsync=False)
    _fill(log)
    del log
    gc.collect()
    assert capsys.readouterr().err == ""
    run = load_run(tmp_path / "r")
    assert run.series("loss")["value"].tolist() == [1.0, 2.0, 3.0] and len(run.class_losses) == 4


SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from loaders import RunLogger
    LOG = RunLogger(sys.argv[1], class_names=["a", "b"], flush_every=100, fsync=False)
    for step in range(5):
        LOG.log_step(step, loss=1.0)
    LOG.log_class_losses(0, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    if sys.argv[2] == "full":
        for key, fd in LOG._fds.items():
            os.close(fd)
            LOG._fds[key] = os.open("/dev/full", os.O_WRONLY)
    # exit without close(): the atexit hook flushes
""")


@pytest.mark.parametrize("disk", ["full", "ok"])
def test_atexit_flush(tmp_path: Path, disk: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "r"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(out), disk], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    if disk == "ok":
        assert p.stderr == ""
        assert len(load_run(out).series("loss")) == 5
        return
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert str(out) in lines[0] and "at exit" in lines[0]
    assert "5 step record(s) and 1 per-class batch(es) not written" in lines[0]
