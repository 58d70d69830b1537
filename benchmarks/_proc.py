"""Whole-process timing for the checkpoint benchmarks: wall and CPU seconds and peak RSS of a
command, T0 = ``python -c "import torch"`` timed in the same run, and a plain read of the bytes.

CPU seconds (user + sys of the process and the children it waited for) are printed beside wall
seconds: on a shared machine the wall clock measures the neighbours too.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Timed:
    wall: float
    cpu: float
    peak_mb: float       # largest resident set of the process (or of a worker it started)
    rc: int
    out: str


def run(cmd: list[str], cwd: Path = ROOT) -> Timed:
    """Run `cmd` under /usr/bin/time: wall (here), CPU seconds and peak RSS (its rusage).

    Not this process's own wait4: Linux carries the high-water RSS of the forking process across
    exec into the child's ru_maxrss, so a benchmark that has imported torch would report at
    least its own size for every command; /usr/bin/time forks the command from a small process.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", tf.name, *cmd], cwd=cwd,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        user, system, kb = tf.read().split()[-3:]
    return Timed(wall, float(user) + float(system), int(kb) / 1024, p.returncode, p.stdout)


def trainaudit(*args: str) -> Timed:
    return run([sys.executable, "-m", "analyze", *args])


def t0(repeat: int = 3) -> Timed:
    """Median over `repeat` runs of ``python -c "import torch"``."""
    runs = [run([sys.executable, "-c", "import torch"]) for _ in range(repeat)]
    return Timed(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs),
                 max(r.peak_mb for r in runs), 0, "")


def read_seconds(paths: list[Path], repeat: int = 2) -> float:
    """Best time to read every byte of `paths` (page cache warm after the first pass)."""
    best = float("inf")
    buf = bytearray(16 << 20)
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        best = min(best, time.perf_counter() - start)
    return best


def files_of(path: Path) -> list[Path]:
    return sorted(q for q in path.iterdir() if q.is_file()) if path.is_dir() else [path]


def row(label: str, r: Timed, base: Timed, read: float) -> str:
    return (f"  {label:<34s} {r.wall:7.2f} s = {r.wall / base.wall:5.2f} T0 = {r.wall / read:7.1f} x read | "
            f"cpu {r.cpu:7.2f} s = {r.cpu / base.cpu:5.2f} T0cpu | peak {r.peak_mb:6.0f} MB"
            f"{'' if r.rc == 0 else f'  (exit {r.rc})'}")
