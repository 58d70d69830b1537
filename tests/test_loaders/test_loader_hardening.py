"""Loader details behind bad-inputs.md rows D13 (DDP rank logs), A12 (Hugging Face hub cache
symlinks stay allowed inside their repository folder) and F3 (batched audit of small tensors)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loaders.checkpoints import iter_tensors
from loaders.detect import detect_format, open_run, rank_logs
from loaders.errors import TrainauditError


@pytest.mark.parametrize("names, ranks", [
    (["metrics.rank0.jsonl", "metrics.rank1.jsonl"], [0, 1]),
    (["train_rank0.log", "train_rank1.log", "train_rank12.log"], [0, 1, 12]),
    (["rank0.jsonl", "rank1.jsonl"], [0, 1]),
    (["log-rank-2.csv", "log-rank-3.csv"], [2, 3]),
    (["metrics.rank0.jsonl"], None),                          # one file: a plain log
    (["metrics.rank0.jsonl", "other.rank1.jsonl"], None),      # two different logs
    (["metrics.rank0.jsonl", "metrics.jsonl"], None),
    (["metrics.rank0.jsonl", "metrics.rank1.csv"], None),
    (["frank0.jsonl", "frank1.jsonl"], None),                  # "rank" inside a word is not a rank
])
def test_rank_log_names(names: list[str], ranks: list[int] | None) -> None:
    got = rank_logs([Path("/x") / n for n in names])
    assert (None if got is None else sorted(got)) == ranks


def _write(p: Path, rows: list[dict]) -> None:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rank_zero_missing_uses_the_lowest_rank(tmp_path: Path) -> None:
    for r in (1, 2):
        _write(tmp_path / f"m.rank{r}.jsonl", [{"step": s, "loss": float(r)} for s in range(5)])
    run = open_run(tmp_path)
    assert any("rank 0 missing (no m.rank0.jsonl)" in w for w in run.warnings)
    assert run.series("loss")["value"].tolist() == [1.0] * 5
    assert run.series("loss/rank2")["value"].tolist() == [2.0] * 5
    assert run.meta["ranks"] == [1, 2] and run.meta["world_size"] == 3
    assert run.steps_logged == 5


def test_forced_format_on_a_rank_folder_and_per_rank_csv(tmp_path: Path) -> None:
    for r in range(2):
        _write(tmp_path / f"m.rank{r}.jsonl", [{"step": s, "loss": 1.0 + r} for s in range(3)])
    assert sorted(open_run(tmp_path, format="jsonl").scalars["series"].unique()) == ["loss", "loss/rank1"]
    csvs = tmp_path / "csv"
    csvs.mkdir()
    for r in range(2):  # Lightning-style columns: still one plain CSV log per rank
        (csvs / f"t_rank{r}.csv").write_text("epoch,step,train_loss\n" + "".join(f"0,{s},{r}\n" for s in range(4)))
    assert detect_format(csvs) == "csv"
    run = open_run(csvs)
    assert run.series("loss/rank1")["value"].tolist() == [1.0] * 4


def test_single_file_rank_field_without_world_size(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    _write(p, [{"step": s, "rank": r, "loss": float(r)} for s in range(4) for r in (0, 2)])
    run = open_run(p)
    assert any("rank 1 missing (no records with this rank)" in w for w in run.warnings)
    assert sorted(run.scalars["series"].unique()) == ["loss", "loss/rank2"]
    all_zero = tmp_path / "zero.jsonl"     # a rank field that is always 0: an ordinary log
    _write(all_zero, [{"step": s, "rank": 0, "loss": 1.0} for s in range(4)])
    run = open_run(all_zero)
    assert list(run.scalars["series"].unique()) == ["loss"] and not run.warnings


def test_hub_cache_snapshot_links_into_blobs_are_followed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"a": torch.eye(3)}, repo / "blobs" / "1111")
    save_file({"b": 2 * torch.eye(2)}, repo / "blobs" / "2222")
    (repo / "blobs" / "3333").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    os.symlink("../../blobs/1111", snap / "model-00001-of-00002.safetensors")
    os.symlink("../../blobs/2222", snap / "model-00002-of-00002.safetensors")
    os.symlink("../../blobs/3333", snap / "model.safetensors.index.json")
    assert {n: float(t.sum()) for n, t in iter_tensors(snap)} == {"a": 3.0, "b": 4.0}
    outside = tmp_path / "secret.safetensors"   # a link leaving the repository folder is still refused
    save_file({"s": torch.ones(1)}, outside)
    os.remove(snap / "model-00002-of-00002.safetensors")
    os.symlink(outside, snap / "model-00002-of-00002.safetensors")
    with pytest.raises(TrainauditError, match="points outside the checkpoint folder"):
        list(iter_tensors(snap))


def test_batched_audit_matches_one_tensor_at_a_time() -> None:
    from analyze.pipeline import audit as A

    g = torch.Generator().manual_seed(0)
    items = [(f"m{i}", torch.randn(5, 7, generator=g)) for i in range(6)]
    items += [(f"v{i}", torch.randn(7, generator=g)) for i in range(3)]
    items += [(f"h{i}", torch.randn(3, 2, 2, generator=g).to(torch.bfloat16)) for i in range(3)]
    items += [("bad0", torch.tensor([[1.0, math.nan]])), ("bad1", torch.tensor([[2.0, 3.0]]))]
    one = [A._health(n, t) for n, t in items]
    batched = (A._health_batch(items[:6]) + A._health_batch(items[6:9]) + A._health_batch(items[9:12])
               + A._health_batch(items[12:]))
    for a, b in zip(one, batched, strict=True):
        assert (a.name, a.shape, a.dtype, a.numel, a.nonfinite, a.skip_reason) == \
               (b.name, b.shape, b.dtype, b.numel, b.nonfinite, b.skip_reason)
        for f in ("max_abs", "sigma", "err_bound", "stable_rank"):
            x, y = getattr(a, f), getattr(b, f)
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-6 * abs(x), (a.name, f, x, y)
    # and against independent references
    ref = float(torch.linalg.matrix_norm(items[0][1].double(), ord=2))
    assert abs(batched[0].sigma - ref) <= 1e-6 * ref
    assert batched[0].max_abs == float(items[0][1].abs().max())
    assert batched[12].nonfinite == 1 and math.isnan(batched[12].sigma)
