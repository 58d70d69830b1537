"""loaders.tensor_reader: every tensor of single and sharded safetensors checkpoints read back
exactly (half types widened in place, block by block, against torch's own .float()), in index
order, with the fused reducer's extremes and sum of squares against numpy float64; the recycled
buffer contract; missing shards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analyze.pipeline.tensor_norms import FusedNorms
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef
from loaders.tensor_reader import CONVERT_BLOCK, RECYCLE_MIN, TensorReader, TensorStream

# sizes around every boundary: small (own memory), RECYCLE_MIN, one block + a bit (in-place
# widening: the first block overlaps itself), several blocks and a ragged end
SHAPES = {"a.small": (7, 5), "b.exact": (RECYCLE_MIN,), "c.block": (CONVERT_BLOCK + 3,),
          "d.multi": (3 * CONVERT_BLOCK // 256 + 1, 256), "e.vec": (1000,)}


def _tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 3).to(dtype) for n, s in SHAPES.items()}


def _sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shards + index, HF style; the index lists shard 2 first for no tensor (order by file)."""
    names = list(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    wm = {}
    for fname, ns in parts.items():
        save_file({n: tensors[n] for n in ns}, str(folder / fname))
        wm.update({n: fname for n in ns})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stream_exact_in_order_with_fused_norms(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    folder = _sharded(tmp_path, tensors)
    seen = []
    for item in TensorStream(folder, reducer=FusedNorms):
        ref = tensors[item.name]
        assert item.stored_dtype == str(dtype).removeprefix("torch.")
        assert item.tensor.dtype == torch.float32 and item.tensor.shape == ref.shape
        assert torch.equal(item.tensor, ref.float()), item.name
        x = ref.float().numpy().astype(np.float64)
        assert item.reduced.lo == x.min() and item.reduced.hi == x.max()
        assert math.isclose(item.reduced.sum_sq, float((x * x).sum()), rel_tol=1e-6)
        assert item.reduced.finite
        seen.append(item.name)
    assert seen == list(tensors)          # shard order, then offsets within each shard


def test_recycled_buffers_and_kept_small_tensors(tmp_path: Path) -> None:
    tensors = _tensors(torch.bfloat16, seed=1)
    p = tmp_path / "one.safetensors"
    save_file(tensors, str(p))
    kept = {}
    for item in TensorStream(p):
        if item.tensor.numel() < RECYCLE_MIN:
            kept[item.name] = item.tensor             # the caller's to keep
        else:
            kept[item.name] = item.tensor.clone()     # recycled: cloned, as documented
    for n, t in kept.items():
        assert torch.equal(t, tensors[n].float()), n


def test_nonfinite_reported_by_the_reducer(tmp_path: Path) -> None:
    t = torch.randn(RECYCLE_MIN + 5).to(torch.bfloat16)
    t[RECYCLE_MIN + 2] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file({"w": t}, str(p))
    (item,) = list(TensorStream(p, reducer=FusedNorms))
    assert not item.reduced.finite


def test_reader_by_name_on_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loaders.tensor_reader.ROW_BLOCK_ELEMENTS", 1 << 16)  # several row blocks
    tensors = _tensors(torch.bfloat16, seed=2)
    folder = _sharded(tmp_path, tensors)
    r = TensorReader(CheckpointRef(1, folder, "hf-dir"), ["c.block", "d.multi", "a.small"])
    assert r._kept is None
    for n in ("c.block", "d.multi", "a.small"):
        t, _ = r.get(n)
        assert torch.equal(t, tensors[n].float()), n
    assert r.get("b.exact") == (None, None)                   # not asked for
    shape = SHAPES["d.multi"]
    blocks = list(r.row_blocks("d.multi", shape))
    assert len(blocks) > 1 and torch.equal(torch.cat([b for _, b in blocks]), tensors["d.multi"].float())
    assert r.row_blocks("d.multi", (1, 2)) is None            # shape changed
    assert r._kept is None                                    # nothing read as a whole
    r.close()


def test_missing_shard_after_the_others(tmp_path: Path) -> None:
    tensors = _tensors(torch.float32, seed=3)
    folder = _sharded(tmp_path, tensors)
    (folder / "model-00002-of-00002.safetensors").unlink()
    got = []
    with pytest.raises(TrainauditError, match="missing shard model-00002-of-00002"):
        for item in TensorStream(folder):
            got.append(item.name)
    assert got == ["a.small", "b.exact"]
    w = DataWarnings()
    assert [i.name for i in TensorStream(folder, warnings=w, partial=True)] == ["a.small", "b.exact"]
    assert any("missing shard" in x for x in w)


def _reads_once_blocked(stream_iter, reads: list[str], settle: float = 0.5) -> int:
    """Number of tensors the reader thread has read once it stops reading (it waits for room)."""
    import time

    seen, still = -1, time.monotonic()
    while time.monotonic() - still < settle:
        if len(reads) != seen:
            seen, still = len(reads), time.monotonic()
        time.sleep(0.02)
    return len(reads)


def test_stream_reads_ahead_while_the_waiting_tensors_are_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors queue up to a quarter of the largest tensor's bytes (so its read overlaps their
    compute), and no further: the memory bound holds while the caller sits on one item."""
    import loaders.tensor_reader as tr

    big = RECYCLE_MIN * 16                       # 4 MiB float32: the allowance is 1 MiB
    small = {f"s{i:02d}": torch.full((RECYCLE_MIN // 2,), float(i)) for i in range(20)}   # 128 KiB each
    p = tmp_path / "m.safetensors"
    save_file({**small, "zz.big": torch.ones(big)}, str(p))
    reads: list[str] = []
    real = tr._read
    monkeypatch.setattr(tr, "_read", lambda files, loc, *a, **k: (reads.append(loc.name), real(files, loc, *a, **k))[1])
    it = iter(TensorStream(p))
    first = next(it)                             # the caller holds s00 and does not ask again yet
    n = _reads_once_blocked(it, reads)
    # the caller's, then reads while the waiting ones hold < 1 MiB: 8 of 128 KiB (one ahead would be 3)
    assert n == 1 + 8, reads
    assert first.name == "s00" and torch.equal(first.tensor, small["s00"])
    rest = [item.name for item in it]
    assert rest == [f"s{i:02d}" for i in range(1, 20)] + ["zz.big"]


def test_stream_of_same_sized_tensors_keeps_one_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of one size never fit under a quarter of the largest: one waits, one is read."""
    import loaders.tensor_reader as tr

    p = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((RECYCLE_MIN,), float(i)) for i in range(8)}, str(p))
    reads: list[str] = []
    real = tr._read
    monkeypatch.setattr(tr, "_read", lambda files, loc, *a, **k: (reads.append(loc.name), real(files, loc, *a, **k))[1])
    it = iter(TensorStream(p))
    next(it)
    assert _reads_once_blocked(it, reads) == 3   # the caller's, one waiting, one read ahead
    assert [item.name for item in it] == [f"t{i}" for i in range(1, 8)]
