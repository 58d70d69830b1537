"""Per-checkpoint tasks (analyze.pipeline.scheduler, weights_task, runners): the same bits serially, on a process pool and on a Dask
LocalCluster; a checkpoint failing mid-chain restarts the chains exactly; the cache still serves
every checkpoint (failed ones included) on a second run."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from analyze.pipeline import scheduler
from analyze.cli import main
from analyze.config import AnalysisConfig
from analyze.pipeline.runners import DASK_HINT, SerialRunner, make_runner
from analyze.pipeline.scheduler import CheckpointOutcome, plan_checkpoint, plan_groups, run_checkpoints
from analyze.pipeline.weights_task import WeightsResult, WeightsTask, run_weights_task
from analyze.pipeline.analysis import analyze_run
from analyze.pipeline.tables import TABLE_COLUMNS
from loaders.errors import TrainauditError
from loaders.run import CheckpointRef, Run

SHAPES = {"a.weight": (48, 32), "b.weight": (32, 64), "c.weight": (24, 24), "c.bias": (24,)}


def _checkpoints(folder: Path, n: int = 5) -> list[CheckpointRef]:
    """n checkpoints of three matrices (and a bias) drifting a little from one step to the next."""
    rng = np.random.default_rng(3)
    base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for j in range(n):
        step = 10 * j
        p = folder / f"step_{step:08d}.safetensors"
        save_file({k: torch.tensor(v + 0.05 * j * rng.standard_normal(v.shape), dtype=torch.float32)
                   for k, v in base.items()}, str(p))
        refs.append(CheckpointRef(step, p, "safetensors"))
    return refs


def _frames(outcomes: list[CheckpointOutcome]) -> dict[str, pd.DataFrame]:
    return {t: pd.DataFrame([r for o in outcomes for r in o.rows.get(t, [])]) for t in ("spectral", "update_ratio")}


class LastFirstRunner:
    """In this process, newest task first: one group's chain runs to the end before the others start
    (workers=2 gives 4 groups), so a failure found later forces a restart."""

    workers = 2

    def __init__(self) -> None:
        self.queue: list = []

    def submit(self, tag, fn, arg) -> None:
        self.queue.append((tag, fn, arg))

    def next_done(self):
        tag, fn, arg = self.queue.pop()
        return tag, fn(arg)

    def close(self) -> None:
        pass


def test_failure_found_after_other_chains_passed_it_restarts_them(tmp_path: Path, monkeypatch) -> None:
    refs = _checkpoints(tmp_path)
    plans = [plan_checkpoint(r) for r in refs]
    assert len(set(plan_groups(plans, 4).values())) == 4  # every tensor its own chain
    bad_step, calls = 20, []
    real = scheduler.run_weights_task

    def flaky(task):
        calls.append((task.ref.step, task.group))
        if task.ref.step == bad_step and task.group == 0:
            return WeightsResult(task.ref.step, task.group, (), {}, f"{task.ref.path}: simulated read error")
        return real(task)

    monkeypatch.setattr(scheduler, "run_weights_task", flaky)
    cfg = AnalysisConfig(exact_svd=True)
    got: list[CheckpointOutcome] = []
    run_checkpoints(plans, cfg=cfg, exact=True, init_vectors={}, init_prev=None, probe_spec=None,
                    runner=LastFirstRunner(), on_done=got.append)
    # the chains of groups 1-3 went through step 20 before group 0 failed there, and were redone after it
    assert calls.count((30, 3)) == 2 and calls.count((40, 3)) == 2
    monkeypatch.setattr(scheduler, "run_weights_task", real)
    ref_out: list[CheckpointOutcome] = []
    run_checkpoints([p for p in plans if p.ref.step != bad_step], cfg=cfg, exact=True, init_vectors={},
                    init_prev=None, probe_spec=None, runner=SerialRunner(), on_done=ref_out.append)
    assert [o.ref.step for o in got] == [0, 10, 20, 30, 40]
    assert got[2].error and "simulated read error" in got[2].warnings[-1] and "step 20 skipped" in got[2].warnings[-1]
    ok = [o for o in got if not o.error]
    for name, expect in _frames(ref_out).items():
        pd.testing.assert_frame_equal(_frames(ok)[name], expect, check_exact=True, obj=name)
    ur = _frames(ok)["update_ratio"]
    assert set(ur.loc[ur["step"] == 30, "prev_step"]) == {10}  # compared with the last readable checkpoint
    for a, b in zip(ok, ref_out):
        assert a.notes == b.notes and sorted(a.vectors) == sorted(b.vectors)
        for k in a.vectors:
            assert torch.equal(a.vectors[k], b.vectors[k]), k


def test_a_tensor_gives_the_same_row_whatever_its_group(tmp_path: Path) -> None:
    refs = _checkpoints(tmp_path, n=2)
    cfg = AnalysisConfig(exact_svd=True)
    names = tuple(SHAPES)
    together = run_weights_task(WeightsTask(refs[1], refs[0], names, {}, cfg, True, 0))
    alone = run_weights_task(WeightsTask(refs[1], refs[0], ("c.weight",), {}, cfg, True, 1))
    row = {t.name: t for t in together.tensors}["c.weight"]
    assert row == alone.tensors[0]  # cold start seeded by (seed, name): nothing leaks from a.weight, b.weight
    assert torch.equal(together.vectors["est:c.weight"], alone.vectors["est:c.weight"])
    # and against numpy: exact sigma_1 of the stored float32 matrix
    from safetensors.torch import load_file

    m = load_file(str(refs[1].path))["c.weight"].double().numpy()
    assert row.spectral["sigma_exact"] == pytest.approx(np.linalg.svd(m, compute_uv=False)[0], rel=1e-12)
    assert {t.name: t.skip for t in together.tensors}["c.bias"] == "1-D tensor: no spectral norm"


def _run(tmp: Path) -> Run:
    refs = _checkpoints(tmp / "checkpoints", n=4)
    bad = tmp / "checkpoints" / "step_00000015.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    refs.insert(2, CheckpointRef(15, bad, "safetensors"))
    scalars = pd.DataFrame({"step": np.arange(40), "series": "loss", "value": np.linspace(3, 1, 40)})
    return Run(path=tmp, name="synthetic", source_format="synthetic", scalars=scalars, checkpoints=refs)


def test_pool_matches_serial_and_cache_replays_failed_checkpoints(tmp_path: Path) -> None:
    run = _run(tmp_path)
    serial = analyze_run(run, AnalysisConfig(exact_svd=True), cache_dir=tmp_path / "c1")
    pool = analyze_run(run, AnalysisConfig(exact_svd=True, workers=2), cache_dir=tmp_path / "c2")
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(serial.tables[name], pool.tables[name], check_exact=True, obj=name)
    assert serial.notes == pool.notes and serial.data_warnings == pool.data_warnings
    assert sorted(serial.tables["spectral"]["step"].unique()) == [0, 10, 20, 30]
    assert sum("step 15 skipped" in w for w in serial.data_warnings) == 1
    again = analyze_run(run, AnalysisConfig(exact_svd=True, workers=2), cache_dir=tmp_path / "c2")
    assert (again.cache_hits, again.cache_misses) == (5, 0)  # the unreadable one is not re-read either
    assert again.data_warnings == pool.data_warnings
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(again.tables[name], pool.tables[name], check_exact=True, obj=name)
    # a changed last checkpoint: only it is recomputed, warm-started from the cached vectors
    last = run.checkpoints[-1].path
    save_file({k: torch.ones(s) for k, s in SHAPES.items()}, str(last))
    third = analyze_run(run, AnalysisConfig(exact_svd=True, workers=2), cache_dir=tmp_path / "c2")
    assert (third.cache_hits, third.cache_misses) == (4, 1)
    sp = third.tables["spectral"]
    row = sp[(sp["step"] == 30) & (sp["tensor"] == "a.weight")].iloc[0]
    assert row["sigma_exact"] == pytest.approx(np.sqrt(48 * 32), rel=1e-12) and bool(row["power_warm_start"])


def test_dask_local_cluster_gives_the_serial_bits(tiny_demo_run: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed", reason="dask[distributed] is an optional extra")
    serial = analyze_run(tiny_demo_run, AnalysisConfig(workers=1))
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster:
        lines: list[str] = []
        dask = analyze_run(tiny_demo_run, AnalysisConfig(scheduler=cluster.scheduler_address),
                           cache_dir=tmp_path / "cache", progress=lines.append)
        assert any("Dask cluster" in line for line in lines)
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(serial.tables[name], dask.tables[name], check_exact=True, obj=name)
    assert serial.notes == dask.notes
    assert not dask.tables["attention"].empty and not dask.tables["grad_ratio"].empty  # model passes ran there
    # cached: no task at all, so no cluster is needed any more
    again = analyze_run(tiny_demo_run, AnalysisConfig(scheduler="tcp://127.0.0.1:9"), cache_dir=tmp_path / "cache")
    assert (again.cache_hits, again.cache_misses) == (3, 0)


def test_scheduler_without_dask_or_unreachable_is_one_line_exit_2(tiny_demo_run: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the [dask] extra were not installed
    with pytest.raises(TrainauditError, match="pip install 'trainaudit\\[dask\\]'"):
        make_runner(2, "tcp://127.0.0.1:9")
    run = tmp_path / "run"
    shutil.copytree(tiny_demo_run, run, ignore=shutil.ignore_patterns("report"))
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "o"), "--scheduler", "tcp://x:1"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.strip().splitlines()[-1] == f"trainaudit: error: {DASK_HINT}"


def test_weights_task_values_against_numpy_with_recycled_buffers(tmp_path: Path) -> None:
    """One task over tensors of falling size (a big one first, so its read buffer is reused for
    the later ones), a 4-D weight and a bf16 one: every sigma, stable rank and update ratio
    against a float64 numpy reference computed from the files."""
    g = torch.Generator().manual_seed(11)
    shapes = {"big.weight": (700, 400), "conv.weight": (16, 8, 3, 3), "mid.weight": (130, 200),
              "half.weight": (150, 140), "small.weight": (9, 12), "bias": (400,)}
    refs = []
    for j, step in enumerate((100, 200)):
        tensors = {k: torch.randn(s, generator=g) * (1 + j * 0.01) for k, s in shapes.items()}
        tensors["half.weight"] = tensors["half.weight"].to(torch.bfloat16)
        p = tmp_path / f"step_{step:08d}.safetensors"
        save_file(tensors, str(p))
        refs.append(CheckpointRef(step, p, "safetensors"))
    cfg = AnalysisConfig(exact_svd=True)
    first = run_weights_task(WeightsTask(refs[0], None, plan_checkpoint(refs[0]).names, {}, cfg, True, 0))
    res = run_weights_task(WeightsTask(refs[1], refs[0], plan_checkpoint(refs[1]).names, first.vectors,
                                                cfg, True, 0))
    assert not res.error
    from safetensors.torch import load_file as torch_load  # the safetensors library's reader, not ours

    new_t, old_t = torch_load(str(refs[1].path)), torch_load(str(refs[0].path))
    by_name = {t.name: t for t in res.tensors}
    assert by_name["bias"].spectral is None and "1-D" in by_name["bias"].skip
    for name in ("big.weight", "conv.weight", "mid.weight", "half.weight", "small.weight"):
        w = new_t[name].double().reshape(new_t[name].shape[0], -1).numpy()
        w0 = old_t[name].double().reshape(old_t[name].shape[0], -1).numpy()
        s = np.linalg.svd(w, compute_uv=False)
        row, upd = by_name[name].spectral, by_name[name].update
        assert abs(row["sigma_est"] - s[0]) / s[0] <= 1e-3 and row["sigma_exact"] == pytest.approx(s[0], rel=1e-9)
        assert row["stable_rank"] == pytest.approx((w ** 2).sum() / s[0] ** 2, rel=1e-6)
        assert upd["update_ratio"] == pytest.approx(np.linalg.norm(w - w0) / np.linalg.norm(w0), rel=1e-6)
        assert upd["update_ratio_per_step"] == pytest.approx(upd["update_ratio"] / 100, rel=1e-12)
