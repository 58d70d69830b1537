"""Big training logs: loading them and reporting on them, as whole processes.

    python benchmarks/logs.py                          # 2M-line foreign JSONL: load + report cold/cached
    python benchmarks/logs.py --lines 10000000         # the 10M-line case (peak RSS target 512 MB)
    python benchmarks/logs.py --csv --lines 10000000   # our run format's train.csv instead
    python benchmarks/logs.py --no-report              # the loader alone

The foreign log is JSONL, ``{"step": N, "loss": X}`` per line and ``"val_loss"`` every 1000
steps, floats written as Python writes them (17 significant digits). Every figure is a fresh
process, timed here and measured with /usr/bin/time -v (peak RSS), and printed as a ratio to
T0 = ``python -c "import torch"`` and to reading the same bytes (``cat FILE > /dev/null`` and a
Python loop reading 1 MiB blocks), all timed in the same run (the machine may be shared).
Targets (2M lines): report cold <= 6 T0, cached <= 2.4 T0; 10M lines: report cold <= 60 s at
<= 512 MB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]

LOAD = r"""
import sys, time
t0 = time.perf_counter()
if sys.argv[2] == "cli":
    from analyze.cli import keep_freed_heap
    keep_freed_heap()
from loaders import load_run
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
run = load_run(sys.argv[1])
dt = time.perf_counter() - t0
print(run.steps_logged, f"{dt:.3f}", f"{t_import:.2f}", len(run.warnings))
"""


def write_jsonl(path: Path, lines: int, val_every: int = 1000) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for lo in range(0, lines, 500_000):
            s = np.arange(lo, min(lines, lo + 500_000))
            loss = 3.0 * np.exp(-s / 2e6) + rng.normal(0, 0.05, len(s))
            f.write("".join(f'{{"step": {i}, "loss": {v!r}, "val_loss": {v + 0.1!r}}}\n' if i % val_every == 0
                            else f'{{"step": {i}, "loss": {v!r}}}\n' for i, v in zip(s.tolist(), loss.tolist())))


def write_csv_run(run: Path, lines: int) -> Path:
    """Our run format: train.csv as the RunLogger writes it, plus run.json."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"format_version": 1, "run_name": "big"}))
    rng = np.random.default_rng(0)
    with open(run / "train.csv", "w") as f:
        f.write("step,loss,grad_norm,lr,wall_time\n")
        for lo in range(0, lines, 500_000):
            step = np.arange(lo, min(lines, lo + 500_000))
            loss = 3.0 * np.exp(-step / 2e6) + rng.normal(0, 0.05, len(step))
            gn = np.abs(rng.normal(1.0, 0.2, len(step)))
            f.write("".join(f"{s},{a!r},{b!r},0.0003,{1.7e9 + s * 0.05:.6f}\n" for s, a, b in
                            zip(step.tolist(), loss.tolist(), gn.tolist())))
    return run / "train.csv"


class Timed(NamedTuple):
    wall: float   # seconds
    cpu: float    # user + system seconds (steadier than wall time on a shared machine)
    rss: float    # peak RSS, MB
    out: str      # stdout


def timed(cmd: list[str]) -> Timed:
    """One fresh process under /usr/bin/time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")

    def field(name: str) -> float:
        m = re.search(name + r": ([0-9.]+)", proc.stderr)
        return float(m.group(1)) if m else float("nan")

    cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
    return Timed(dt, cpu, field(r"Maximum resident set size \(kbytes\)") / 1024, proc.stdout)


def read_bytes(path: Path) -> tuple[float, float]:
    """Seconds of `cat FILE > /dev/null` and of a Python loop reading 1 MiB blocks (page cache warm)."""
    t0 = time.perf_counter()
    subprocess.run(f"cat {path} > /dev/null", shell=True, check=True)
    cat = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return cat, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--csv", action="store_true", help="our run format's train.csv instead of a foreign JSONL")
    ap.add_argument("--no-report", action="store_true", help="time the loader only")
    ap.add_argument("--dir", type=Path, default=None, help="keep the generated log here (reused if present)")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="trainaudit-logs-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.csv:
            target = root / f"run_{args.lines}"
            data = target / "train.csv"
            if not data.exists():
                write_csv_run(target, args.lines)
        else:
            target = data = root / f"log_{args.lines}.jsonl"
            if not data.exists():
                write_jsonl(data, args.lines)
        size = data.stat().st_size
        t0s = [timed([sys.executable, "-c", "import torch"]) for _ in range(3)]
        t0 = min(t.wall for t in t0s)
        t0_cpu = min(t.cpu for t in t0s)
        cat, pyread = read_bytes(data)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.lines:,} lines "
              f"({size / 1e6:.0f} MB, {'train.csv' if args.csv else 'foreign JSONL'})")
        print(f"T0 = python -c 'import torch' (best of 3): {t0:.2f} s wall, {t0_cpu:.2f} s CPU; reading the bytes: "
              f"cat {cat:.3f} s, Python 1 MiB blocks {pyread:.3f} s")

        def show(what: str, t: Timed, extra: str = "") -> None:
            print(f"  {what:27s} wall {t.wall:6.2f} s = {t.wall / t0:5.2f} T0, CPU {t.cpu:6.2f} s = "
                  f"{t.cpu / t0_cpu:5.2f} T0cpu = {t.wall / max(pyread, 1e-9):5.0f}x reading; "
                  f"peak RSS {t.rss:5.0f} MB {extra}")

        # A bare process, as a library user's; then with the heap kept as the CLI keeps it
        # (analyze.cli.keep_freed_heap), as under `trainaudit report`.
        for label, mode in (("load_run", "bare"), ("load_run, CLI's heap", "cli")):
            t = timed([sys.executable, "-c", LOAD, str(target), mode])
            steps, load_s, imp, nwarn = t.out.split()
            show(label, t, f"| in process {float(load_s):.2f} s = {int(steps) / float(load_s):,.0f} lines/s, "
                           f"{float(load_s) * 1e9 / args.lines:.0f} ns/line; imports {imp} s; {nwarn} warnings")
        if not args.no_report:
            out_dir = root / f"report_{args.lines}"
            shutil.rmtree(out_dir, ignore_errors=True)
            cmd = [sys.executable, "-m", "analyze", "report", str(target), "--out", str(out_dir), "--workers", "1"]
            show("trainaudit report, cold", timed(cmd), "(target <= 6 T0)" if args.lines == 2_000_000 else
                 "(target <= 60 s, <= 512 MB)" if args.lines == 10_000_000 else "")
            show("trainaudit report, cached", timed(cmd), "(target <= 2.4 T0)" if args.lines == 2_000_000 else "")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
