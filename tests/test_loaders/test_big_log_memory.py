"""A 1,000,000-line training log loads in a subprocess with peak RSS under 256 MB (the
10-million-line case is benchmarks/logs.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import sys
from loaders import load_run
run = load_run(sys.argv[1])
loss = run.series("loss")
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(run.steps_logged, peak, float(loss["value"].iloc[-1]), int(loss["step"].iloc[-1]))
"""


def test_one_million_line_log_loads_in_bounded_memory(tmp_path: Path) -> None:
    n = 1_000_000
    run = tmp_path / "big"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format_version": 1}))
    step = np.arange(n)
    loss = 2.0 + np.sin(step / 1000.0)
    with open(run / "train.csv", "w") as f:
        f.write("step,loss,grad_norm,lr,wall_time\n")
        for lo in range(0, n, 200_000):
            s = step[lo: lo + 200_000].tolist()
            f.write("".join(f"{i},{v!r},1.5,0.001,{1.7e9 + i:.6f}\n" for i, v in zip(s, loss[lo: lo + 200_000].tolist())))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, env=env, check=True)
    steps, peak_kb, last_loss, last_step = out.stdout.split()
    assert int(steps) == n and int(last_step) == n - 1
    assert abs(float(last_loss) - loss[-1]) < 1e-6 * abs(loss[-1])   # float32 storage of big logs
    assert int(peak_kb) / 1024 < 256, f"peak RSS {int(peak_kb) / 1024:.0f} MB"


def test_one_million_line_foreign_jsonl_loads_in_bounded_memory(tmp_path: Path) -> None:
    """A 1M-line foreign JSONL (the block parser's path) in a subprocess: every record kept,
    exact values, peak RSS under 256 MB (imports alone are ~70 MB; the text is 45 MB)."""
    n = 1_000_000
    p = tmp_path / "metrics.jsonl"
    loss = 2.0 + np.sin(np.arange(n) / 1000.0)
    with open(p, "w") as f:
        for lo in range(0, n, 200_000):
            f.write("".join(f'{{"step": {i}, "loss": {v!r}}}\n' if i % 1000 else f'{{"step": {i}, "loss": {v!r}, "val_loss": 1.5}}\n'
                            for i, v in zip(range(lo, lo + 200_000), loss[lo: lo + 200_000].tolist())))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = CHILD + "print(len(run.evals), float(loss['value'].sum()))\n"
    out = subprocess.run([sys.executable, "-c", child, str(p)], capture_output=True, text=True, env=env, check=True)
    first, second = out.stdout.strip().splitlines()
    steps, peak_kb, last_loss, last_step = first.split()
    n_evals, total = second.split()
    assert int(steps) == n and int(last_step) == n - 1 and int(n_evals) == n // 1000
    assert float(last_loss) == loss[-1] and float(total) == float(loss.sum())   # float64, exact
    assert int(peak_kb) / 1024 < 256, f"peak RSS {int(peak_kb) / 1024:.0f} MB"
