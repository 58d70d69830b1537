"""Time `trainaudit report` on the 2000-step demo run (21 checkpoints), cold and cached.

Target: cold <= 30 s on the 2-core machine; a cached re-run recomputes nothing.

    python benchmarks/report.py                  # trains the demo first (a few minutes)
    python benchmarks/report.py --run runs/demo  # an existing 2000-step demo run
    python benchmarks/report.py --run runs/demo --workers 2 --repeat 2

Prints T0 (`python -c "import torch"`, timed in the same run) and, per mode: the command as a fresh
process (interpreter start and imports included) as wall and CPU time, each also as a ratio to T0,
its peak RSS and the heavy modules it imported (a cached report should import none), and the
in-process split (load + analysis, render + write) measured with the library
call the command makes.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


_HEAVY = ("torch", "scipy", "matplotlib", "seaborn", "dask")
_DRIVER = """
import sys
from analyze.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
print("HEAVY", ",".join(m for m in %r if m in sys.modules))
""" % (_HEAVY,)


def _timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall s, CPU s (user + system), peak RSS MB (/usr/bin/time -v) and stdout of a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0

    def field(name: str) -> float:
        m = re.search(name + r": ([0-9.]+)", proc.stderr)
        return float(m.group(1)) if m else float("nan")

    cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
    return wall, cpu, field(r"Maximum resident set size \(kbytes\)") / 1024, proc.stdout


def t0_import_torch() -> tuple[float, float]:
    """T0: `python -c "import torch"` (best of 3), wall and CPU seconds."""
    runs = [_timed([sys.executable, "-c", "import torch"]) for _ in range(3)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _command_full(run: Path, out: Path, workers: int) -> tuple[float, float, float, str]:
    """The report command as a fresh process: wall, CPU, peak RSS and the heavy modules it imported."""
    wall, cpu, rss, stdout = _timed([sys.executable, "-c", _DRIVER, "report", str(run), "--out", str(out),
                                     "--workers", str(workers)])
    heavy = next((ln[6:] for ln in stdout.splitlines() if ln.startswith("HEAVY ")), "?")
    return wall, cpu, rss, heavy


def _command(run: Path, out: Path, workers: int) -> float:
    return _command_full(run, out, workers)[0]


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
        t0, t0_cpu = t0_import_torch()
        print(f"T0 = python -c 'import torch': {t0:.2f} s wall, {t0_cpu:.2f} s CPU")
        cold, cached, split_cold, split_cached = [], [], [], []
        for i in range(args.repeat):
            out = tmp / f"out{i}"
            cold.append(_command_full(run, out, args.workers))
            cached.append(_command_full(run, out, args.workers))
            shutil.rmtree(out)
            split_cold.append(_in_process(run, out, args.workers))
            split_cached.append(_in_process(run, out, args.workers))
            shutil.rmtree(out)
        med = statistics.median
        for name, runs in (("cold", cold), ("cached", cached)):
            wall, cpu, rss = (med(r[k] for r in runs) for k in range(3))
            print(f"trainaudit report, fresh process, {name:6s}: wall {wall:5.1f} s = {wall / t0:4.2f} T0, CPU {cpu:5.1f} s "
                  f"= {cpu / t0_cpu:4.2f} T0cpu, peak RSS {rss:4.0f} MB; heavy modules imported: {runs[-1][3] or 'none'}")
        print("  (targets: cold <= 30 s; cached <= 3 s, importing none of torch, scipy, matplotlib, seaborn)")
        for name, split in (("cold", split_cold), ("cached", split_cached)):
            a, r = med(s[0] for s in split), med(s[1] for s in split)
            print(f"  in-process {name:6s}: load + analysis {a:5.1f} s, render + write {r:5.1f} s, "
                  f"total {a + r:5.1f} s (checkpoints from cache: {split[-1][2]})")
        print(f"  load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
