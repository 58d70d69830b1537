"""torch.distributed.checkpoint folders written by torch itself (no process group): every tensor
read back equal to the original and bit for bit equal to what torch's own reader (dcp.load)
returns, one at a time, tensors stored as several chunks (as FSDP saves them) assembled, .metadata
never unpickled beyond its data classes, and audit / spectral / report accept the folder (values
against numpy references)."""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from analyze.cli.checkpoint import audit, spectral
from loaders.checkpoint_files import checkpoint_kind
from loaders.checkpoints import checkpoint_info, iter_tensors
from loaders.dcp import iter_dcp_tensors, read_dcp_info
from loaders.errors import TrainauditError
from loaders.tensor_reader import TensorReader, TensorStream
from loaders.run import CheckpointRef


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "_orig_mod.emb.weight": torch.randn(40, 16, generator=g),
        "_orig_mod.fc.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "_orig_mod.fc.bias": torch.randn(24, generator=g).to(torch.float16),
        "_orig_mod.conv.weight": torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64),
        "_orig_mod.pos": torch.arange(7),
        "_orig_mod.step": 1234,                        # a non-tensor entry: never loaded
    }


def _save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dcp") / "step_100"
    state = _state(0)
    return _save(state, folder), state


def test_torch_writes_dcp_without_process_group(saved: tuple[Path, dict]) -> None:
    folder, _ = saved
    assert not torch.distributed.is_initialized()
    assert (folder / ".metadata").is_file() and any(p.suffix == ".distcp" for p in folder.iterdir())
    assert checkpoint_kind(folder) == "dcp"


def test_every_tensor_read_back_equal(saved: tuple[Path, dict]) -> None:
    folder, state = saved
    got = list(iter_tensors(folder))
    want = {k.removeprefix("_orig_mod."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert sorted(n for n, _ in got) == sorted(want)          # prefix stripped, the int entry left out
    for name, t in got:
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    info = checkpoint_info(folder)
    assert info.kind == "dcp" and info.stripped_prefix == "_orig_mod."
    assert info.n_params == sum(v.numel() for v in want.values())
    assert {t.name: (t.shape, t.dtype) for t in info.tensors} == \
        {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in want.items()}
    assert read_dcp_info(folder).skipped == ("_orig_mod.step",)


def test_stream_and_reader_one_tensor_at_a_time(saved: tuple[Path, dict]) -> None:
    folder, state = saved
    with TensorStream(folder) as stream:
        for item in stream:
            ref = state["_orig_mod." + item.name]
            assert item.stored_dtype == str(ref.dtype).removeprefix("torch.")
            expect = ref.float() if ref.dtype in (torch.bfloat16, torch.float16) else ref
            assert torch.equal(item.tensor, expect), item.name
    r = TensorReader(CheckpointRef(100, folder, "dcp"), ["fc.weight", "emb.weight"])
    t, _ = r.get("fc.weight")
    assert torch.equal(t, state["_orig_mod.fc.weight"].float())
    assert r.get("fc.bias") == (None, None)                    # not among the reader's names
    assert r._kept is None                                     # nothing read as a whole
    blocks = r.row_blocks("emb.weight", (40, 16))
    assert blocks is not None and torch.equal(torch.cat([b for _, b in blocks]), state["_orig_mod.emb.weight"])
    r.close()


def _rewrite_metadata(folder: Path, data: bytes) -> None:
    (folder / ".metadata").write_bytes(data)


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os
        return (os.system, ("touch /tmp/trainaudit-dcp-pwned",))


def test_crafted_metadata_is_refused_not_run(tmp_path: Path) -> None:
    folder = _save({"w": torch.ones(3, 3)}, tmp_path / "evil")
    marker = Path("/tmp/trainaudit-dcp-pwned")
    marker.unlink(missing_ok=True)
    _rewrite_metadata(folder, pickle.dumps(_Boom()))
    with pytest.raises(TrainauditError, match=r"refused to load (posix|os)\.system"):
        list(iter_tensors(folder))
    assert not marker.exists()
    _rewrite_metadata(folder, b"not a pickle")
    with pytest.raises(TrainauditError, match="not a readable DCP metadata file"):
        read_dcp_info(folder)


def _tampered(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    folder = _save({"w": torch.ones(30, 30)}, tmp_path / "t")
    md = read_dcp_info(folder).metadata
    edit(md)
    buf = io.BytesIO()
    pickle.Pickler(buf).dump(md)
    _rewrite_metadata(folder, buf.getvalue())
    return folder


def test_storage_outside_folder_or_oversized_tensor_refused(tmp_path: Path) -> None:
    def escape(md):  # type: ignore[no-untyped-def]
        for info in md.storage_data.values():
            info.relative_path = "../outside.distcp"
    with pytest.raises(TrainauditError, match="invalid storage entry"):
        read_dcp_info(_tampered(tmp_path / "a", escape))

    def huge(md):  # type: ignore[no-untyped-def]
        md.state_dict_metadata["w"].size = torch.Size([100000, 100000])
    with pytest.raises(TrainauditError, match="declares 40000000000 bytes"):
        read_dcp_info(_tampered(tmp_path / "b", huge))

    folder = _save({"w": torch.ones(30, 30)}, tmp_path / "c" / "t")
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(TrainauditError, match="truncated"):
        list(iter_dcp_tensors(folder))


def test_audit_and_spectral_accept_the_folder(saved: tuple[Path, dict]) -> None:
    folder, state = saved
    res = CliRunner().invoke(audit, [str(folder), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    findings = out["findings"] if isinstance(out, dict) else out
    sig = {f["tensor"]: f["value"] for f in findings if f["code"] == "spectral_norm"}
    for name in ("emb.weight", "fc.weight"):
        ref = np.linalg.norm(state["_orig_mod." + name].double().numpy(), 2)
        assert abs(sig[name] - ref) <= 1e-4 * ref, name
    res = CliRunner().invoke(spectral, [str(folder), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    rows = out["rows"] if isinstance(out, dict) else out
    conv = next(r for r in rows if r["tensor"] == "conv.weight")
    ref = np.linalg.norm(state["_orig_mod.conv.weight"].numpy().reshape(4, -1), 2)
    assert abs(conv["sigma_est"] - ref) <= 1e-4 * ref


def test_report_on_a_folder_of_dcp_checkpoints(tmp_path: Path) -> None:
    from analyze.pipeline.analysis import analyze_run

    run = tmp_path / "run"
    s1, s2 = _state(1), _state(1)
    s2["_orig_mod.emb.weight"] = s1["_orig_mod.emb.weight"] * 1.5
    _save(s1, run / "step_100")
    _save(s2, run / "step_200")
    res = analyze_run(run)
    up = res.tables["update_ratio"]
    row = up[(up["tensor"] == "emb.weight") & (up["step"] == 200)]
    assert len(row) == 1 and abs(float(row["update_ratio"].iloc[0]) - 0.5) < 1e-6   # ||1.5W - W|| / ||W||
    spec = res.tables["spectral"]
    assert set(spec["step"]) == {100, 200}
    ref = np.linalg.norm(s2["_orig_mod.emb.weight"].numpy(), 2)
    got = float(spec[(spec["tensor"] == "emb.weight") & (spec["step"] == 200)]["sigma_est"].iloc[0])
    assert abs(got - ref) <= 1e-4 * ref


# --------------------------------------------------------------------------- against torch's reader


def _torch_reads(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor as torch's own FileSystemReader + dcp.load assembles it into a tensor of its
    declared shape (plain pickle.load of .metadata: these are the tests' own folders)."""
    md = FileSystemReader(str(folder)).read_metadata()
    targets = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in md.state_dict_metadata.items() if hasattr(m, "chunks")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(targets, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return targets


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_as_torch(folder: Path, got: dict[str, torch.Tensor]) -> None:
    want = _torch_reads(folder)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        t = got[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.is_contiguous(), name
        assert torch.equal(_bits(t), _bits(ref)), name


def test_bit_for_bit_as_torch_reads_without_its_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 30, generator=g)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    state = {"w": w, "h": torch.randn(64, generator=g).to(torch.float16), "mask": torch.rand(9, generator=g) > 0.5,
             "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 7), "n": torch.arange(5)}
    folder = _save(state, tmp_path / "d")
    want = _torch_reads(folder)
    monkeypatch.setattr(dcp, "load", None)           # items are read without torch's reader
    got = dict(iter_dcp_tensors(folder))
    for name, ref in want.items():
        assert torch.equal(_bits(got[name]), _bits(ref)) and got[name].shape == ref.shape, name
        assert got[name].untyped_storage().nbytes() == got[name].nbytes, name   # owns its bytes only
    assert torch.equal(_bits(got["w"]), _bits(w))


def test_stream_transform_items_go_through_torchs_reader(saved: tuple[Path, dict]) -> None:
    folder, _ = saved
    info = read_dcp_info(folder)
    import dataclasses

    marked = dataclasses.replace(info, chunks={k: tuple(dataclasses.replace(c, transformed=True) for c in v)
                                               for k, v in info.chunks.items()})
    _assert_same_as_torch(folder, dict(iter_dcp_tensors(folder, info=marked)))


class _Sharded:
    """A tensor saved as the given blocks, each its own storage item, as the ranks of an FSDP job
    save their shards: torch's planner asks it for its write items and each block's data."""

    def __init__(self, full: torch.Tensor, blocks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        self.full, self.blocks = full, blocks

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.full)
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(off), torch.Size(size)),
                                                      properties=props, size=self.full.size()))
                for off, size in self.blocks]

    def block(self, offsets: tuple[int, ...]) -> torch.Tensor:
        size = next(s for o, s in self.blocks if tuple(o) == tuple(offsets))
        return self.full[tuple(slice(o, o + n) for o, n in zip(offsets, size))].clone()


class _ShardPlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> object:
        obj = self.state_dict[index.fqn]
        return obj.block(index.offset) if isinstance(obj, _Sharded) else super().lookup_object(index)


def _rows(n: int, cols: int, cuts: list[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    edges = [0, *cuts, n]
    return [((a, 0), (b - a, cols)) for a, b in zip(edges, edges[1:])]


def _save_chunked(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(50, 12, generator=g)
    fc = torch.randn(9, 10, generator=g).to(torch.bfloat16)
    vec = torch.randn(11, generator=g, dtype=torch.float64)
    plain = torch.randn(6, 4, generator=g)
    grid = [((r, c), (nr, nc)) for r, nr in ((0, 4), (4, 5)) for c, nc in ((0, 3), (3, 7))]
    state = {"emb": _Sharded(emb, _rows(50, 12, [13, 26, 39])),       # FSDP: rows over 4 ranks (uneven)
             "fc": _Sharded(fc, grid),                                  # 2-D blocks, bf16
             "vec": _Sharded(vec, [((0,), (6,)), ((6,), (5,)), ((11,), (0,))]),   # one rank holds none
             "plain": plain}
    folder = tmp_path / "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(str(folder), thread_count=2), planner=_ShardPlanner())
    return folder, {"emb": emb, "fc": fc, "vec": vec, "plain": plain}


def test_chunked_tensors_written_by_torch_are_assembled(tmp_path: Path) -> None:
    folder, want = _save_chunked(tmp_path)
    assert not torch.distributed.is_initialized()
    info = read_dcp_info(folder)
    assert [len(info.chunks[n]) for n in ("emb", "fc", "vec", "plain")] == [4, 4, 3, 1]
    assert len({c.file for cs in info.chunks.values() for c in cs}) == 2        # two .distcp files
    got = dict(iter_dcp_tensors(folder))
    _assert_same_as_torch(folder, got)
    for name, ref in want.items():
        assert torch.equal(_bits(got[name]), _bits(ref)), name
    assert torch.equal(dict(iter_tensors(folder))["fc"], want["fc"])
    r = TensorReader(CheckpointRef(1, folder, "dcp"), ["emb"])
    t, _ = r.get("emb")
    assert torch.equal(t, want["emb"])
    r.close()


def _retile(tmp_path: Path, sizes: list[int]) -> Path:
    """The chunked folder with emb's chunk row counts replaced (same offsets and items)."""
    folder, _ = _save_chunked(tmp_path)
    md = read_dcp_info(folder).metadata
    for c, n in zip(md.state_dict_metadata["emb"].chunks, sizes):
        c.sizes = torch.Size([n, 12])
    buf = io.BytesIO()
    pickle.Pickler(buf).dump(md)
    _rewrite_metadata(folder, buf.getvalue())
    return folder


@pytest.mark.parametrize("sizes,problem", [
    ([14, 13, 13, 10], "do not tile"),            # first chunk overlaps the second (total still 50)
    ([12, 13, 13, 11], "do not tile"),            # a row nobody stores
    ([13, 13, 13, 12], "chunk outside it"),       # last chunk runs past row 50
])
def test_chunks_that_do_not_tile_the_tensor_are_refused(tmp_path: Path, sizes: list[int], problem: str) -> None:
    with pytest.raises(TrainauditError, match=problem):
        read_dcp_info(_retile(tmp_path, sizes))


def test_item_that_is_not_the_declared_tensor_names_the_file(tmp_path: Path) -> None:
    def as_int(md):  # type: ignore[no-untyped-def]
        md.state_dict_metadata["w"].properties.dtype = torch.int32
    folder = _tampered(tmp_path / "a", as_int)
    with pytest.raises(TrainauditError, match=r"__0_0\.distcp.*stored as float32 \[30, 30\], .metadata says int32"):
        list(iter_dcp_tensors(folder))

    def shifted(md):  # type: ignore[no-untyped-def]
        for info in md.storage_data.values():
            info.offset += 1
            info.length -= 1
    folder = _tampered(tmp_path / "b", shifted)
    with pytest.raises(TrainauditError, match=r"__0_0\.distcp.*cannot read tensor 'w'"):
        list(iter_dcp_tensors(folder))
