"""Whole-process cost of `audit`, weight-only `report` and `spectral` on checkpoints as users save
them, as ratios to T0 (``python -c "import torch"``, same run) and to reading the same bytes.

    python benchmarks/weights_sharded.py [--dir /tmp/ta-bench] [--sizes 10m,124m,1.1b] [--no-report]
                                         [--no-gpt2] [--repeat 1]

* Llama-shaped bf16 folders sharded as Hugging Face saves them (``_llama_weights.py``: config.json,
  model.safetensors.index.json, 1 GB shards) at ~7M / 125M / 1.1B parameters:
  ``audit DIR --json`` and the weight-only ``report DIR`` (no log, no evaluation data); the
  cost per parameter above T0 gives the cost-growth rows of docs/scaling.md.
  Targets (1.1B): audit <= 16 T0 with peak RSS <= 1 GiB; report within 1.5x of audit.
* GPT-2-small float32 file (``_gpt2_weights.py``): ``spectral FILE --json`` <= 1.6 T0.

Generated files are kept in --dir and reused. ``--sizes ""`` runs the GPT-2 case alone;
``--repeat N`` runs every command N times and prints the run of median CPU time (T0: the median
of 2N + 1 runs). Prints figures; not a test.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import Timed, files_of, read_seconds, row, t0, trainaudit  # noqa: E402


def llama(folder: Path, size: str) -> tuple[Path, int]:
    from _llama_weights import LLAMA_SIZES, write_llama

    lay = LLAMA_SIZES[size]
    out = folder / f"llama-{size}"
    if not (out / "config.json").is_file():
        print(f"  writing {out} ({lay.n_params:,} parameters) ...", flush=True)
        write_llama(out, lay)
    return out, lay.n_params


def gpt2(folder: Path) -> Path:
    from _gpt2_weights import write_pair

    existing = sorted(folder.glob("trained_124439808_step_2.safetensors"))
    return existing[0] if existing else write_pair(folder).new


def median_run(repeat: int, *args: str) -> Timed:
    """The run of median CPU time among `repeat` runs of ``trainaudit *args``."""
    runs = sorted((trainaudit(*args) for _ in range(repeat)), key=lambda r: r.cpu)
    return runs[(len(runs) - 1) // 2] if len(runs) > 1 else runs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ta-bench")
    ap.add_argument("--sizes", default="10m,124m,1.1b")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--no-gpt2", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = t0(2 * args.repeat + 1)
    print(f"T0 = python -c 'import torch': {base.wall:.2f} s wall, {base.cpu:.2f} s cpu, {base.peak_mb:.0f} MB")
    growth = []
    for size in filter(None, args.sizes.split(",")):
        folder, n = llama(args.dir, size)
        files = files_of(folder)
        nbytes = sum(f.stat().st_size for f in files)
        read = read_seconds(files)
        print(f"\nLlama {size}: {n:,} bf16 parameters, {len(files)} files, {nbytes / 1e9:.2f} GB; "
              f"reading the bytes (page cache): {read:.2f} s")
        a = median_run(args.repeat, "audit", str(folder), "--json")
        print(row("audit DIR --json", a, base, read))
        r = None
        if not args.no_report:
            out = Path(tempfile.mkdtemp(prefix="ta-report-"))
            r = trainaudit("report", str(folder), "--out", str(out))
            shutil.rmtree(out, ignore_errors=True)
            print(row("report DIR (weight-only)", r, base, read))
            print(f"  report / audit: {r.wall / a.wall:.2f} wall, {r.cpu / a.cpu:.2f} cpu (target <= 1.5)")
        growth.append((size, n, a, r))
    if growth:
        print("\ncost per parameter above T0 (wall; cpu in brackets), ns:")
    for size, n, a, r in growth:
        line = f"  {size:>5s} {n:>14,}  audit {1e9 * (a.wall - base.wall) / n:6.1f} ({1e9 * (a.cpu - base.cpu) / n:5.1f})"
        if r is not None:
            line += f"  report {1e9 * (r.wall - base.wall) / n:6.1f} ({1e9 * (r.cpu - base.cpu) / n:5.1f})"
        print(line)
    if not args.no_gpt2:
        f = gpt2(args.dir)
        read = read_seconds([f])
        print(f"\nGPT-2 small float32 {f.name} ({f.stat().st_size / 1e6:.0f} MB; read {read:.2f} s)")
        s = median_run(args.repeat, "spectral", str(f), "--json")
        print(row("spectral FILE --json", s, base, read) + "   (target <= 1.6 T0)")
        a = median_run(args.repeat, "audit", str(f), "--json")
        print(row("audit FILE --json", a, base, read))


if __name__ == "__main__":
    main()
