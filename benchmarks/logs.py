"""Loading a big training log: lines per second and peak RSS.

    python benchmarks/logs.py [--lines 10000000] [--dir DIR]

Writes a train.csv in our run format (step, loss, grad_norm, lr, wall_time, formatted as the
RunLogger formats them) plus a run.json, then loads it with `loaders.load_run` in a fresh
subprocess (so the RSS is the loader's alone) and prints lines/s and peak RSS.
Targets: >= 500,000 lines/s, peak RSS <= 256 MB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import sys, time

def hwm_kb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

t0 = time.perf_counter()
from loaders import load_run
t_import = time.perf_counter() - t0
base = hwm_kb()
t0 = time.perf_counter()
run = load_run(sys.argv[1])
dt = time.perf_counter() - t0
loss = run.series("loss")
print(f"{run.steps_logged} {dt:.3f} {hwm_kb()} {base} {len(run.warnings)} {t_import:.2f}")
print("notes:", run.notes)
"""


def write_log(run: Path, lines: int) -> float:
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"format_version": 1, "run_name": "big"}))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with open(run / "train.csv", "w") as f:
        f.write("step,loss,grad_norm,lr,wall_time\n")
        chunk = 500_000
        for start in range(0, lines, chunk):
            n = min(chunk, lines - start)
            step = np.arange(start, start + n)
            loss = 3.0 * np.exp(-step / 2e6) + rng.normal(0, 0.05, n)
            gn = np.abs(rng.normal(1.0, 0.2, n))
            wall = 1.7e9 + step * 0.05
            # repr-like 17-significant-digit floats, as RunLogger writes them
            body = "\n".join(f"{s},{a!r},{b!r},0.0003,{w:.6f}" for s, a, b, w in
                             zip(step.tolist(), loss.tolist(), gn.tolist(), wall.tolist()))
            f.write(body + "\n")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=10_000_000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="trainaudit-logs-"))
    run = root / f"run_{args.lines}"
    if not (run / "train.csv").exists():
        t = write_log(run, args.lines)
        print(f"wrote {args.lines:,} lines ({(run / 'train.csv').stat().st_size / 1e6:.0f} MB) in {t:.1f} s")
    out = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, check=True)
    first, notes = out.stdout.strip().splitlines()[:2]
    steps, dt, rss, base, nwarn, t_import = first.split()
    steps, dt, rss_mb, base_mb = int(steps), float(dt), int(rss) / 1024, int(base) / 1024
    print(f"loaded {steps:,} steps in {dt:.2f} s = {steps / dt:,.0f} lines/s (target >= 500,000)")
    print(f"peak RSS {rss_mb:.0f} MB (target <= 256 MB); after imports {base_mb:.0f} MB; warnings {nwarn}")
    print(notes)


if __name__ == "__main__":
    main()
