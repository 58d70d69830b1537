"""Scale of `trainaudit report`: the demo report cold and cached, analysis time against
the number of checkpoints, and serial vs a process pool vs a Dask LocalCluster, same bits.

    python benchmarks/scale.py --demo /tmp/ta/demo2000     # an existing 2000-step demo run
    python benchmarks/scale.py                             # trains the demo first (a few minutes)

(a) `trainaudit report` on the 2000-step demo run (21 checkpoints) as a fresh process, cold and
    cached (benchmarks/report.py's timer), with --workers 1 and the default (one per core).
(b) analysis time of synthetic MiniGPT runs with 5, 20 and 80 checkpoints (same 800 logged steps,
    same evaluation set; weights a random walk from a fresh MiniGPT, written with the RunLogger),
    in process, serial: seconds per checkpoint says whether growth is linear.
(c) the 20-checkpoint run serially, with --workers 2 (process pool) and on a Dask LocalCluster of
    2 single-threaded worker processes; every table compared with pandas.testing (check_exact).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py's helpers


def synthetic_run(out: Path, n_checkpoints: int, steps: int = 800, seed: int = 0) -> Path:
    """A MiniGPT run dir: `steps` logged steps of a falling loss, the demo's evaluation set, and
    `n_checkpoints` checkpoints evenly spread, the weights a small random walk (no training)."""
    import torch

    from analyze.demo import corpus
    from analyze.demo.model import MiniGPT, MiniGPTConfig
    from loaders.logger import RunLogger

    torch.manual_seed(seed)
    vocab = corpus.vocabulary()
    val = corpus.encode(corpus.build_examples("val"), vocab)
    cfg = MiniGPTConfig(vocab_size=len(vocab), context=corpus.CONTEXT)
    model = MiniGPT(cfg)
    ck_steps = {round(i * steps / max(1, n_checkpoints - 1)) for i in range(n_checkpoints)}
    g = torch.Generator().manual_seed(seed)
    with RunLogger(out, class_names=corpus.CLASS_NAMES, run_name=out.name, fsync=False,
                   model={"name": "minigpt", "config": cfg.to_dict()}, seed=seed) as log:
        log.save_eval_set(input_ids=val.input_ids, targets=val.targets, target_mask=val.target_mask,
                          attention_mask=val.attention_mask, class_ids=val.class_ids)
        per_ex = torch.empty(64)
        cls = torch.arange(64) % 2
        for step in range(steps + 1):
            base = 3.0 * float(torch.exp(torch.tensor(-step / 200.0))) + 0.5
            if step % 50 == 0:
                log.log_eval(step, split="val", loss=base + 0.1)
            if step in ck_steps:
                log.save_checkpoint(step, model)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
            log.log_step(step, loss=base + 0.02 * float(torch.randn((), generator=g)), grad_norm=1.0, lr=1e-3)
            log.log_class_losses(step, per_ex.normal_(base, 0.3, generator=g) + 0.3 * cls, cls)
    return out


def _analyse(run: Path, repeat: int = 1, **cfg):
    """Seconds (best of `repeat`: the machine is shared) and the result of analyze_run, no cache."""
    from analyze.config import AnalysisConfig
    from analyze.pipeline.analysis import analyze_run

    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = analyze_run(run, AnalysisConfig(**cfg))
        best = min(best, time.perf_counter() - t0)
    return best, res


def part_a(demo: Path, tmp: Path) -> None:
    from report import _command  # benchmarks/report.py: the command as a fresh process

    n_ck = len(list((demo / "checkpoints").glob("step_*.safetensors")))
    print(f"(a) trainaudit report on {demo} ({n_ck} checkpoints), fresh process each time")
    for workers in (1, os.cpu_count() or 1):
        out = tmp / f"a{workers}"
        if out.exists():
            shutil.rmtree(out)
        cold = _command(demo, out, workers)
        cached = _command(demo, out, workers)
        print(f"    --workers {workers}: cold {cold:5.1f} s, cached {cached:4.1f} s   (targets: cold <= 30 s, "
              f"cached <= 3 s)")
    # where the cached run's time goes: imports (python -X importtime) against the work itself
    import subprocess

    t0 = time.perf_counter()
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "analyze", "report", str(demo), "--out",
                          str(out)], check=True, capture_output=True, text=True).stderr
    total = time.perf_counter() - t0
    cum: dict[str, float] = {}  # top-level package -> seconds, summed over its outermost imports
    for line in err.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2][1:]
            if name.strip() == "torch":
                cum["torch"] = int(parts[1]) / 1e6
            if not name.startswith(" "):  # outermost: not imported by another module's import
                top = name.split(".")[0]
                cum[top] = cum.get(top, 0.0) + int(parts[1]) / 1e6
    shown = ", ".join(f"{m} {cum[m]:.2f} s" for m in ("analyze", "torch", "scipy", "reports", "loaders", "matplotlib")
                      if m in cum)
    names = {ln.split("|")[2].strip() for ln in err.splitlines() if ln.startswith("import time:") and ln.count("|") == 2}
    heavy = [m for m in ("torch", "scipy", "matplotlib", "seaborn", "dask") if m in names]
    print(f"    cached run under -X importtime: {total:.1f} s in all; outermost imports: {shown}; "
          f"heavy libraries imported: {', '.join(heavy) or 'none of torch, scipy, matplotlib, seaborn, dask'}")
    from scipy import stats  # noqa: F401 - imported first, so the timing below is the work alone

    from report import _in_process

    a, r, hits = _in_process(demo, out, 1)
    print(f"    the cached work itself, in process: load + analysis {a:.2f} s, render + write {r:.2f} s "
          f"({hits} checkpoints from the cache)")
    shutil.rmtree(out)


def part_b(tmp: Path) -> dict[int, Path]:
    print("(b) analysis time against the number of checkpoints (MiniGPT, 103k parameters, in process, serial, "
          "exact SVD on, model pass on 320 eval examples)")
    runs, rows = {}, []
    for n in (5, 20, 80):
        t0 = time.perf_counter()
        runs[n] = synthetic_run(tmp / f"ck{n}", n)
        made = time.perf_counter() - t0
        sec, res = _analyse(runs[n], workers=1)
        assert len(res.tables["spectral"]["step"].unique()) == n
        rows.append((n, sec, made))
    print("    checkpoints   analysis s   s/checkpoint   (run written in)")
    for n, sec, made in rows:
        print(f"    {n:11d}   {sec:10.2f}   {sec / n:12.3f}   ({made:.1f} s)")
    marginal = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(rows, rows[1:])]
    grow = marginal[1] / marginal[0]
    print(f"    marginal cost per added checkpoint: {marginal[0]:.3f} s (5 -> 20), {marginal[1]:.3f} s (20 -> 80); "
          f"ratio {grow:.2f} -> {'linear (a fixed start-up cost plus a constant per checkpoint)' if grow < 1.3 else 'NOT linear'}")
    return runs


def part_c(run: Path) -> None:
    import pandas as pd

    print(f"(c) the {run.name} run (20 checkpoints): serial vs a process pool vs Dask LocalCluster, 2 workers each")
    s_sec, serial = _analyse(run, 2, workers=1)
    p_sec, pool = _analyse(run, 2, workers=2)
    try:
        from distributed import LocalCluster
    except ImportError:
        print("    dask.distributed is not installed (pip install 'trainaudit[dask]'): Dask column skipped")
        results = {"serial": (s_sec, serial), "--workers 2": (p_sec, pool)}
    else:
        import dask

        results = {"serial": (s_sec, serial), "--workers 2": (p_sec, pool)}
        # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
        # dynamic mmap threshold: every large torch allocation is a fresh mmap (page faults), and
        # the model pass runs ~1.6x slower; the worker's stack profiler (every 10 ms) takes the GIL
        # from the task thread. Timed with both off ("tuned"), then with Dask's defaults (the nanny
        # also sets the variable in this process's environment, hence this order and the pop).
        tuned = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                 "distributed.worker.profile.enabled": False}
        for label, env in (("Dask, tuned", tuned), ("Dask defaults", {})):
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
            with dask.config.set(env):
                t0 = time.perf_counter()
                with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster:
                    started = time.perf_counter() - t0
                    _analyse(run, scheduler=cluster.scheduler_address)  # workers import torch on their first task
                    results[label] = _analyse(run, 2, scheduler=cluster.scheduler_address)
        print(f"    (a LocalCluster starts in {started:.1f} s; Dask timed after a warm-up run; best of 2 each)")
    for name, (sec, res) in results.items():
        same = True
        for t in serial.tables:
            try:
                pd.testing.assert_frame_equal(serial.tables[t], res.tables[t], check_exact=True, obj=t)
            except AssertionError:
                same = False
        print(f"    {name:15s} {sec:6.2f} s   speed-up {s_sec / sec:4.2f}x   tables identical to serial: "
              f"{'yes' if same and res.notes == serial.notes else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="an existing 2000-step demo run (default: train one)")
    ap.add_argument("--skip-demo", action="store_true", help="skip part (a)")
    args = ap.parse_args()
    import torch

    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="ta-scale-"))
    t_all = time.perf_counter()
    try:
        if not args.skip_demo:
            demo = args.demo
            if demo is None:
                from analyze.demo.train import DemoSettings, train_demo

                t0 = time.perf_counter()
                demo = train_demo(tmp / "demo", DemoSettings(steps=2000))
                print(f"trained the 2000-step demo in {time.perf_counter() - t0:.0f} s")
            part_a(demo, tmp)
        runs = part_b(tmp)
        part_c(runs[20])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
