"""torch.distributed.checkpoint folders written by torch itself (no process group): every tensor
read back equal to the original, one at a time, .metadata never unpickled beyond its data
classes, and audit / spectral / report accept the folder (values against numpy references)."""
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
