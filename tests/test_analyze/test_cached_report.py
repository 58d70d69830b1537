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


def _big_table(n: int = 1_000_000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"step": np.arange(n, dtype=np.int64), "series": np.where(np.arange(n) % 7, "loss", "lr"),
                         "value": rng.normal(size=n), "spike": rng.random(n) < 0.01})


def test_table_digest_follows_every_value() -> None:
    """The figure cache's key and the tables' stamps hash native data: one changed value (or
    dtype, or name) anywhere in a 1M-row table changes the digest; an equal copy does not."""
    from reports.page import FigureCache, table_digest

    df = _big_table()
    base = table_digest(df)
    assert table_digest(df.copy()) == base
    key = FigureCache.key("plot_loss", (df,), {})
    assert FigureCache.key("plot_loss", (df.copy(),), {}) == key
    changes = {
        "value": lambda d: d.__setitem__("value", d["value"].where(d.index != 777_777, d["value"] + 1e-12)),
        "step": lambda d: d.__setitem__("step", d["step"].where(d.index != 3, 4)),
        "series": lambda d: d.__setitem__("series", d["series"].where(d.index != 999_999, "grad_norm")),
        "spike": lambda d: d.__setitem__("spike", d["spike"] ^ (d.index == 12)),
        "dtype": lambda d: d.__setitem__("step", d["step"].astype(np.float64)),
        "name": lambda d: setattr(d, "columns", ["step", "series", "loss", "spike"]),
    }
    for what, change in changes.items():
        other = df.copy()
        change(other)
        assert table_digest(other) != base, what
        assert FigureCache.key("plot_loss", (other,), {}) != key, what


def test_unchanged_tables_are_not_rewritten(tmp_path: Path) -> None:
    from analyze.pipeline.cache import write_tables

    tables = {"train": _big_table(50_000), "small": pd.DataFrame({"a": [1.5, float("nan")], "b": ["x", None]})}
    folder, cache = tmp_path / "tables", tmp_path / "cache"
    folder.mkdir()
    assert write_tables(tables, folder, cache) == ["train", "small"]
    for name, df in tables.items():  # what pandas writes, byte for byte
        assert (folder / f"{name}.csv").read_text() == df.to_csv(index=False)
    assert write_tables(tables, folder, cache) == []
    changed = dict(tables, train=tables["train"].copy())
    changed["train"].loc[40_000, "value"] = 0.0
    assert write_tables(changed, folder, cache) == ["train"]
    assert (folder / "train.csv").read_text() == changed["train"].to_csv(index=False)
    (folder / "small.csv").write_text("edited by hand\n")       # the file changed: written again
    assert write_tables(changed, folder, cache) == ["small"]
    (folder / "small.csv").unlink()
    assert write_tables(changed, folder, cache) == ["small"]
    assert write_tables(changed, folder, None) == ["train", "small"]   # no cache folder: always written
