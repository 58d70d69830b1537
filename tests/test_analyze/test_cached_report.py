"""A report served wholly from the output folder's cache: it imports no torch (the cached demo
report in <= 3 s, torch's import alone is ~1.5 s), and everything it serves from the cache -
checkpoint rows, per-class tables, warm-start vectors - is what a fresh computation gives."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyze.pipeline.cache import CheckpointCache, as_tensors
from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run

REPO = Path(__file__).resolve().parents[2]
CLASS_TABLES = ("class_losses", "tau", "class_gaps")

# Runs the `report` command in a fresh interpreter and says which heavy modules it imported.
DRIVER = """
import json, sys
from analyze.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
HEAVY = ("torch", "analyze.pipeline.scheduler", "analyze.pipeline.weights_task", "analyze.pipeline.probe_task",
         "analyze.pipeline.runners", "loaders.tensor_reader", "analyze.metrics.losses", "analyze.metrics.spectral",
         "safetensors.torch")
print(json.dumps({"code": code, "imported": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def _report(run: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, "report", str(run), "--out", str(out), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cached_report_imports_no_torch_and_writes_the_same_tables(tiny_demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    first = _report(tiny_demo_run, out)  # computes every checkpoint: torch is needed
    assert first["code"] == 0 and "torch" in first["imported"]
    tables_first = {p.name: p.read_bytes() for p in (out / "tables").glob("*.csv")}
    second = _report(tiny_demo_run, out)
    assert second == {"code": 0, "imported": []}
    assert {p.name: p.read_bytes() for p in (out / "tables").glob("*.csv")} == tables_first
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert any("all 3 checkpoint(s) served from the cache" in n for n in notes)
    # a cache written before the per-class tables were cached (no class_tables entry): computed
    # once more with torch, then served
    for p in (out / "cache").glob("class_tables-*.json"):
        p.unlink()
    assert "torch" in _report(tiny_demo_run, out)["imported"]
    assert _report(tiny_demo_run, out)["imported"] == []
    assert {p.name: p.read_bytes() for p in (out / "tables").glob("*.csv")} == tables_first


def test_cached_class_tables_follow_their_inputs(tiny_demo_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = AnalysisConfig(workers=1)

    def same_as_uncached(run, cfg: AnalysisConfig) -> dict[str, pd.DataFrame]:
        cached = analyze_run(run, cfg, cache_dir=cache)
        fresh = analyze_run(run, cfg)
        for name in CLASS_TABLES:
            pd.testing.assert_frame_equal(cached.tables[name], fresh.tables[name], check_exact=True, obj=name)
        assert [n for n in cached.notes if "from the cache" not in n] == fresh.notes
        return cached.tables

    base = same_as_uncached(tiny_demo_run, cfg)
    assert not base["tau"].empty and set(base["tau"]["source"]) >= {"train", "checkpoint"}
    again = same_as_uncached(tiny_demo_run, cfg)  # from the cache
    for name in CLASS_TABLES:
        pd.testing.assert_frame_equal(again[name], base[name], check_exact=True, obj=name)
    # a log-only setting: recomputed (the checkpoint rows still come from the cache)
    wide = same_as_uncached(tiny_demo_run, AnalysisConfig(workers=1, class_window=20))
    assert len(wide["tau"]) != len(base["tau"])
    # changed per-class losses in the logs: recomputed
    from loaders.rundir import load_run

    run = load_run(tiny_demo_run)
    cl = run.class_losses.copy()
    cl["loss_sum"] = cl["loss_sum"] * 1.5
    changed = same_as_uncached(dataclasses.replace(run, class_losses=cl), cfg)
    train = changed["tau"]["source"] == "train"
    assert not np.allclose(changed["tau"].loc[train, "tau"], base["tau"].loc[train, "tau"])
    assert len(list(cache.glob("class_tables-*.json"))) == 1  # stale entries replaced, not piled up


def test_cached_vectors_come_back_bit_for_bit(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = {"est:a": torch.randn(7, generator=gen), "pow:a": torch.randn(3, 5, generator=gen, dtype=torch.float64),
               "est:b": torch.randn(4, generator=gen).to(torch.bfloat16)}  # numpy has no bfloat16
    cache = CheckpointCache(tmp_path)
    cache.store(10, "k", {"spectral": [{"x": 1.0}]}, vectors, ["n"], ["w"])
    hit = cache.load(10, "k")
    assert hit is not None and hit.rows == {"spectral": [{"x": 1.0}]} and (hit.notes, hit.warnings) == (["n"], ["w"])
    back = as_tensors(hit.vectors)
    assert sorted(back) == sorted(vectors)
    for k, v in vectors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # a damaged vectors file is a miss (recomputed), as it always was
    vpath = next(tmp_path.glob("step_00000010-k.safetensors"))
    vpath.write_bytes(vpath.read_bytes()[:-3])
    assert CheckpointCache(tmp_path).load(10, "k") is None
