"""Time `trainaudit report` on the 2000-step demo run (21 checkpoints), cold and cached.

Target: cold <= 30 s on the 2-core machine; a cached re-run recomputes nothing.

    python benchmarks/report.py                  # trains the demo first (a few minutes)
    python benchmarks/report.py --run runs/demo  # an existing 2000-step demo run
    python benchmarks/report.py --run runs/demo --workers 2 --repeat 2

Prints, per mode: wall time of the command as a fresh process (interpreter start and imports
included), and the in-process split (load + analysis, render + write) measured with the library
call the command makes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(run: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "analyze", "report", str(run), "--out", str(out),
                    "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _in_process(run: Path, out: Path, workers: int) -> tuple[float, float, int]:
    from analyze.config import AnalysisConfig
    from analyze.pipeline.analysis import analyze_run
    from analyze.pipeline.output import write_report

    t0 = time.perf_counter()
    res = analyze_run(run, AnalysisConfig(workers=workers), cache_dir=out / "cache")
    t1 = time.perf_counter()
    write_report(res, out / "report.html", figure_cache=out / "cache" / "figures")
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, res.cache_hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing 2000-step demo run (default: train one)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="cold/cached pairs to time (median reported)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ta-bench-"))
    try:
        run = args.run
        if run is None:
            from analyze.demo.train import DemoSettings, train_demo

            t0 = time.perf_counter()
            run = train_demo(tmp / "demo", DemoSettings(steps=2000))
            print(f"trained the 2000-step demo in {time.perf_counter() - t0:.0f} s")
        n_ck = len(list((run / "checkpoints").glob("step_*.safetensors")))
        print(f"run: {run} ({n_ck} checkpoints); {os.cpu_count()} CPUs; workers {args.workers}; "
              f"load average {os.getloadavg()[0]:.1f}")
        cold, cached, split_cold, split_cached = [], [], [], []
        for i in range(args.repeat):
            out = tmp / f"out{i}"
            cold.append(_command(run, out, args.workers))
            cached.append(_command(run, out, args.workers))
            shutil.rmtree(out)
            split_cold.append(_in_process(run, out, args.workers))
            split_cached.append(_in_process(run, out, args.workers))
            shutil.rmtree(out)
        med = statistics.median
        print(f"trainaudit report, fresh process: cold {med(cold):.1f} s, cached {med(cached):.1f} s "
              f"(target: cold <= 30 s)")
        for name, split in (("cold", split_cold), ("cached", split_cached)):
            a, r = med(s[0] for s in split), med(s[1] for s in split)
            print(f"  in-process {name:6s}: load + analysis {a:5.1f} s, render + write {r:5.1f} s, "
                  f"total {a + r:5.1f} s (checkpoints from cache: {split[-1][2]})")
        print(f"  load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
