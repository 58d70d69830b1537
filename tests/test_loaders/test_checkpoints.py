"""loaders.checkpoints: safetensors header checks, safe torch loading, HF folders, names, ties.

bad-inputs.md rows A1-A6, A8, B1-B14, C1, C3-C8. Every security test has a control that runs
the same payload through a plain unpickler in a subprocess and sees the marker file appear.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import runpy
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loaders.checkpoint_files import step_from_name
from loaders.checkpoints import checkpoint_info, iter_tensors, list_tensors, step_metadata
from loaders.errors import DataWarnings, TrainauditError
from loaders.safetensors_file import check_safetensors_header, is_lfs_pointer
from loaders.torch_files import load_torch_object

# --------------------------------------------------------------------------- gadgets and controls


class Gadget:
    """A __reduce__ gadget: unpickling it calls ``fn(*args)``."""

    def __init__(self, fn, args) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.args = fn, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return self.fn, self.args


class PartialGadget:
    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return functools.partial(os.system, f"touch {self.mark}"), ()


def gadgets(mark: Path) -> dict[str, object]:
    code = f"import os; os.system('touch {mark}')"
    return {
        "posix.system": Gadget(os.system, (f"touch {mark}",)),
        "builtins.eval": Gadget(eval, (f"__import__('os').system('touch {mark}')",)),
        "subprocess.Popen": Gadget(subprocess.Popen, (["touch", str(mark)],)),
        "runpy._run_code": Gadget(runpy._run_code, (code, {})),
        "functools.partial": PartialGadget(mark),
    }


_CONTROL = r"""
import importlib, io, sys, time, zipfile
pk = importlib.import_module("pickle")
class U(pk.Unpickler):
    def persistent_load(self, pid):
        return None
    def find_class(self, module, name):  # tensors are not needed to reach the gadget
        if module.startswith("torch"):
            return lambda *a, **k: None
        return super().find_class(module, name)
data = open(sys.argv[1], "rb").read()
if data[:4] == b"PK\x03\x04":
    z = zipfile.ZipFile(io.BytesIO(data))
    data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
buf = io.BytesIO(data)
for _ in range(int(sys.argv[2])):
    try:
        U(buf).load()
    except Exception:
        pass
time.sleep(float(sys.argv[3]))  # subprocess.Popen gadgets finish asynchronously
"""


def control_runs_payload(path: Path, mark: Path, pickles: int = 1, wait: float = 0.0) -> bool:
    """Unpickle the file's payload with a plain unpickler in a subprocess: is the marker created?"""
    assert not mark.exists()
    subprocess.run([sys.executable, "-c", _CONTROL, str(path), str(pickles), str(wait)], check=False, timeout=60,
                   capture_output=True)
    created = mark.exists()
    if created:
        mark.unlink()
    return created


# --------------------------------------------------------------------------- A: code execution


@pytest.mark.parametrize("gadget", ["posix.system", "builtins.eval", "subprocess.Popen", "runpy._run_code",
                                    "functools.partial"])
def test_a1_a2_gadget_in_state_dict_is_refused(tmp_path: Path, gadget: str) -> None:
    mark = tmp_path / "PWNED"
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "x": gadgets(mark)[gadget]}, p)
    with pytest.raises(TrainauditError) as err:
        list(iter_tensors(p))
    msg = str(err.value)
    assert msg.startswith(f"{p}: unsupported global") and msg.endswith("(not loaded)")
    # protocol 2 writes subprocess.Popen under its Python 2 name (pickle's fix_imports)
    assert gadget in msg or (gadget == "subprocess.Popen" and "commands.Popen" in msg)
    assert not mark.exists()
    assert control_runs_payload(p, mark, wait=0.5 if gadget == "subprocess.Popen" else 0.0)  # the payload is live


def test_a1_exact_message(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "x": Gadget(os.system, ("true",))}, p)
    with pytest.raises(TrainauditError, match=r"unsupported global posix\.system \(not loaded\)$"):
        load_torch_object(p)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a3_raw_pickles_every_protocol(tmp_path: Path, protocol: int) -> None:
    mark = tmp_path / "PWNED"
    p = tmp_path / "model.bin"
    with open(p, "wb") as f:
        pickle.dump({"x": Gadget(os.system, (f"touch {mark}",))}, f, protocol=protocol)
    with pytest.raises(TrainauditError) as err:
        list(iter_tensors(p))
    assert "not loaded" in str(err.value) and str(err.value).startswith(str(p))
    if protocol >= 2:
        assert "posix.system" in str(err.value)
    assert not mark.exists()
    assert control_runs_payload(p, mark)


def test_a4_legacy_format_with_gadget(tmp_path: Path) -> None:
    mark = tmp_path / "PWNED"
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2), "x": Gadget(os.system, (f"touch {mark}",))}, p,
               _use_new_zipfile_serialization=False)
    with pytest.raises(TrainauditError, match="posix.system"):
        list(iter_tensors(p))
    assert not mark.exists()
    assert control_runs_payload(p, mark, pickles=4)  # magic, protocol, sys info, then the object


def test_a5_pickle_renamed_safetensors(tmp_path: Path) -> None:
    mark = tmp_path / "PWNED"
    p = tmp_path / "model.safetensors"
    p.write_bytes(pickle.dumps(Gadget(os.system, (f"touch {mark}",)), protocol=4))
    with pytest.raises(TrainauditError, match=r"not a safetensors file \(header too large"):
        list(iter_tensors(p))
    assert not mark.exists()
    assert control_runs_payload(p, mark)


def test_a6_hf_side_files_never_opened(tmp_path: Path) -> None:
    mark = tmp_path / "PWNED"
    d = tmp_path / "checkpoint-10"
    d.mkdir()
    save_file({"w": torch.ones(3, 4)}, d / "model.safetensors")
    for name in ("training_args.bin", "rng_state.pth", "optimizer.pt", "scheduler.pt"):
        torch.save(Gadget(os.system, (f"touch {mark}",)), d / name)
    got = dict(iter_tensors(d))
    assert list(got) == ["w"] and torch.equal(got["w"], torch.ones(3, 4))
    assert not mark.exists()
    assert control_runs_payload(d / "training_args.bin", mark)


def test_a8_torch_load_is_never_called_without_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    real = torch.load

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(2), "x": Gadget(os.system, ("true",))}, bad)
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": Gadget(eval, ("1",))}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"x": Gadget(eval, ("1",))}, protocol=2))
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    for p in (bad, legacy, raw, good):
        try:
            list(iter_tensors(p))
        except TrainauditError:
            pass
    assert calls, "torch.load was never reached"
    assert all(c.get("weights_only") is True for c in calls)


# --------------------------------------------------------------------------- B: safetensors structure


def st_file(p: Path, header: bytes, data: bytes = b"", n: int | None = None) -> Path:
    p.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return p


def hdr(d: dict) -> bytes:  # type: ignore[type-arg]
    return json.dumps(d).encode()


F32 = lambda shape, a, b: {"dtype": "F32", "shape": shape, "data_offsets": [a, b]}  # noqa: E731

B_CASES = {
    "B1 header length > file size": (hdr({"a": F32([2], 0, 8)}), b"\0" * 8, 10_000,
                                     "header length 10000 exceeds file size"),
    "B2 header 2^63": (b"{}", b"", 2**63, "header too large"),
    "B2 header 200 MB": (b"{}", b"", 200_000_000, "header too large"),
    "B3 empty file": (None, b"", None, "file too small to be safetensors"),
    "B3 seven bytes": (None, b"\x01" * 7, None, "file too small to be safetensors"),
    "B4 non-UTF-8 header": (b'{"\xff\xfe": 1}', b"", None, "header is not UTF-8"),
    "B5 not JSON": (b"not json at all", b"", None, "header is not valid JSON"),
    "B5 JSON array": (b"[1,2,3]", b"", None, "header is a JSON list, not an object"),
    "B5 entry not an object": (hdr({"a": 1}), b"", None, "invalid header entry (tensor a)"),
    "B6 overlapping offsets": (hdr({"a": F32([2], 0, 8), "b": F32([2], 4, 12)}), b"\0" * 12, None,
                               "invalid offset for tensor b"),
    "B7 aliasing names": (hdr({"a": F32([2], 0, 8), "b": F32([2], 0, 8)}), b"\0" * 8, None,
                          "invalid offset for tensor b"),
    "B8 gap": (hdr({"a": F32([1], 0, 4), "b": F32([1], 8, 12)}), b"\0" * 12, None,
               "invalid offset for tensor b (gap of 4 bytes"),
    "B8 end < begin": (hdr({"a": F32([1], 8, 4)}), b"\0" * 8, None, "invalid offset for tensor a"),
    "B9 offsets past EOF": (hdr({"a": F32([4], 0, 16)}), b"\0" * 8, None, "data ends at byte 16 but the file holds 8"),
    "B9 trailing garbage": (hdr({"a": F32([2], 0, 8)}), b"\0" * 16, None,
                            "incomplete metadata, file not fully covered"),
    "B10 shape x dtype != span": (hdr({"a": F32([3], 0, 8)}), b"\0" * 8, None,
                                  "does not match the data span (8 bytes) (tensor a)"),
    "B10 overflowing shape": (hdr({"a": F32([2**62, 2**62], 0, 8)}), b"\0" * 8, None,
                              "does not match the data span"),
    "B11 unknown dtype": (hdr({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}), b"\0", None,
                          "unknown dtype 'Q7' (tensor a)"),
    "B11 negative dim": (hdr({"a": F32([-1], 0, 4)}), b"\0" * 4, None, "invalid shape [-1] (tensor a)"),
    "B11 metadata not a string": (hdr({"__metadata__": {"step": 5}, "a": F32([1], 0, 4)}), b"\0" * 4, None,
                                  "metadata value for 'step' is not a string"),
    "duplicate names": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None,
                        "duplicate name in header (tensor a)"),
}


@pytest.mark.parametrize("case", list(B_CASES))
def test_b_rows_safetensors_structure(tmp_path: Path, case: str) -> None:
    header, data, n, problem = B_CASES[case]
    p = tmp_path / "model.safetensors"
    if header is None:
        p.write_bytes(data)
    else:
        st_file(p, header, data, n)
    with pytest.raises(TrainauditError) as err:
        check_safetensors_header(p)
    assert str(err.value).startswith(f"{p}: ") and problem in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainauditError):  # iter_tensors checks before safetensors opens it
        list(iter_tensors(p))


def test_b14_valid_edge_tensors(tmp_path: Path) -> None:
    tensors = {"zero": torch.zeros(0, 16), "scalar": torch.tensor(3.5), "bad": torch.tensor([1.0, float("nan"),
               float("inf")]), "half": torch.randn(4, 5).to(torch.bfloat16), "<script>": torch.ones(2, 2)}
    p = tmp_path / "edge.safetensors"
    save_file(tensors, p)
    check_safetensors_header(p)
    got = dict(iter_tensors(p))
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(torch.nan_to_num(got[k].float()), torch.nan_to_num(t.float()))
    infos = {i.name: i for i in list_tensors(p)}
    assert infos["half"].dtype == "bfloat16" and infos["zero"].shape == (0, 16) and infos["scalar"].shape == ()


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    t = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5), "c.weight": torch.randn(2, 2)}
    save_file({"a.weight": t["a.weight"], "b.weight": t["b.weight"]}, folder / "model-00001-of-00002.safetensors")
    save_file({"c.weight": t["c.weight"]}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                          "b.weight": "model-00001-of-00002.safetensors",
                                                          "c.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return t


def test_sharded_hf_folder_reads_every_shard(tmp_path: Path) -> None:
    t = _sharded(tmp_path / "m")
    got = dict(iter_tensors(tmp_path / "m"))
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)
    assert checkpoint_info(tmp_path / "m").n_params == 12 + 5 + 4


def test_b13_missing_shard_partial_kept(tmp_path: Path) -> None:
    t = _sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    got: dict[str, torch.Tensor] = {}
    with pytest.raises(TrainauditError, match="missing shard model-00002-of-00002.safetensors"):
        for name, x in iter_tensors(tmp_path / "m"):
            got[name] = x
    assert set(got) == {"a.weight", "b.weight"} and torch.equal(got["a.weight"], t["a.weight"])


def test_b13_truncated_last_shard(tmp_path: Path) -> None:
    _sharded(tmp_path / "m")
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    got = []
    with pytest.raises(TrainauditError, match="model-00002-of-00002.safetensors: data ends at byte"):
        for name, _ in iter_tensors(tmp_path / "m"):
            got.append(name)
    assert got == ["a.weight", "b.weight"]


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_may_not_point_outside_its_folder(tmp_path: Path, target: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
    with pytest.raises(TrainauditError, match="points outside the checkpoint folder"):
        list(iter_tensors(d))


# --------------------------------------------------------------------------- C: torch checkpoints


def test_c1_truncated_zip(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) * 99 // 100, 0):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(TrainauditError) as err:
            list(iter_tensors(p))
        assert "truncated or corrupt checkpoint" in str(err.value), str(err.value)
        assert "Errno" not in str(err.value)


def test_c3_benign_foreign_objects_become_placeholders(tmp_path: Path) -> None:
    sd = {"w": torch.randn(3, 3)}
    p = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "args": argparse.Namespace(a=1), "rng": np.random.get_state(),
                "best": np.float64(1.5)}, p)
    w = DataWarnings()
    got = dict(iter_tensors(p, warnings=w))
    assert torch.equal(got["w"], sd["w"])
    assert len(w) == 1 and "argparse.Namespace" in w[0] and "not loaded" in w[0]
    assert "numpy" in w[0]
    legacy = tmp_path / "legacy.pt"  # the same in the pre-1.6 format (globals found with pickletools)
    torch.save({"model": sd, "args": argparse.Namespace(a=1)}, legacy, _use_new_zipfile_serialization=False)
    w2 = DataWarnings()
    assert torch.equal(dict(iter_tensors(legacy, warnings=w2))["w"], sd["w"])
    assert len(w2) == 1 and "argparse.Namespace" in w2[0]


def test_c3_benign_path_objects_vs_path_method_gadgets(tmp_path: Path) -> None:
    import pathlib
    p = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"data": pathlib.PosixPath("/data")}}, p)
    w = DataWarnings()
    assert [n for n, _ in iter_tensors(p, warnings=w)] == ["w"]
    assert len(w) == 1 and "pathlib.PosixPath" in w[0]
    target = tmp_path / "written.txt"
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "x": Gadget(pathlib.Path.write_text, (target, "pwned"))}, bad)
    # protocol 2 pickles the method as builtins.getattr(PosixPath, "write_text")
    with pytest.raises(TrainauditError, match=r"unsupported globals? .*(write_text|builtins\.getattr).*\(not loaded\)$"):
        list(iter_tensors(bad))
    assert not target.exists()


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "module", None])
def test_c4_container_keys(tmp_path: Path, key: str | None) -> None:
    sd = {"layer.weight": torch.randn(2, 3), "layer.bias": torch.randn(2)}
    obj = sd if key is None else {key: sd, "epoch": 3, "optimizer": {"state": {}}}
    p = tmp_path / "c.pt"
    torch.save(obj, p)
    info = checkpoint_info(p)
    assert info.container_key == ("" if key is None else key)
    got = dict(iter_tensors(p))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_c5_no_tensors(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    torch.save({"step": 5}, p)
    with pytest.raises(TrainauditError, match=r"no tensors found \(looked under: model, state_dict"):
        list(iter_tensors(p))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)


def test_c6_compile_and_ddp_prefixes_are_stripped(tmp_path: Path) -> None:
    """torch.compile's OptimizedModule and DDP prefix names this way; renaming reproduces them
    (calling torch.compile costs seconds of import, DDP is exercised for real below)."""
    torch.manual_seed(0)
    model = Tiny()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    variants = {
        "compile": {f"_orig_mod.{k}": v for k, v in plain.items()},
        "module.": {f"module.{k}": v for k, v in plain.items()},
        "_orig_mod.module.": {f"_orig_mod.module.{k}": v for k, v in plain.items()},
        "module._orig_mod.": {f"module._orig_mod.{k}": v for k, v in plain.items()},
    }
    for label, sd in variants.items():
        p = tmp_path / f"{label}.pt"
        torch.save(sd, p)
        got = dict(iter_tensors(p))
        assert set(got) == set(plain), label
        assert all(torch.equal(got[k], plain[k]) for k in plain)
        p2 = tmp_path / f"{label}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, p2)
        assert {i.name for i in list_tensors(p2)} == set(plain)


def test_c6_real_ddp_wrapper(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = Tiny()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        p = tmp_path / "ddp.pt"
        torch.save({"model": ddp.state_dict()}, p)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        assert {n for n, _ in iter_tensors(p)} == set(model.state_dict())
        assert checkpoint_info(p).stripped_prefix == "module."
    finally:
        dist.destroy_process_group()


def test_c7_mixed_prefixes_are_kept_with_a_warning(tmp_path: Path) -> None:
    sd = {"module.a": torch.ones(1), "b": torch.ones(1), "module.c": torch.ones(1)}
    p = tmp_path / "mixed.pt"
    torch.save(sd, p)
    w = DataWarnings()
    assert [n for n, _ in iter_tensors(p, warnings=w)] == ["module.a", "b", "module.c"]
    assert len(w) == 1 and "inconsistent key prefixes" in w[0]


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight


def test_c8_tied_weights_counted_once(tmp_path: Path) -> None:
    m = TiedLM()
    p = tmp_path / "tied.pt"
    torch.save(m.state_dict(), p)
    info = checkpoint_info(p)
    assert info.tied == (("emb.weight", "head.weight"),)
    assert info.n_params == 11 * 6 + 6 * 6 + 6  # the head adds nothing
    assert [n for n, _ in iter_tensors(p)] == ["emb.weight", "mid.weight", "mid.bias"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_c10_permission_denied(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1)}, p)
    os.chmod(p, 0)
    with pytest.raises(TrainauditError, match="permission denied"):
        list(iter_tensors(p))


def test_c10_permission_denied_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same path as chmod 000 for a non-root user: os.open raises PermissionError."""
    import loaders.safeio as safeio
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1)}, p)

    def denied(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safeio.os, "open", denied)
    with pytest.raises(TrainauditError, match=r"model\.safetensors: permission denied$"):
        list(iter_tensors(p))


# --------------------------------------------------------------------------- the rest


def test_sharded_pytorch_model_bin(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    a, b = {"module.x": torch.randn(2, 3)}, {"module.y": torch.randn(4)}
    torch.save(a, d / "pytorch_model-00001-of-00002.bin")
    torch.save(b, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "module.x": "pytorch_model-00001-of-00002.bin", "module.y": "pytorch_model-00002-of-00002.bin"}}))
    got = dict(iter_tensors(d))
    assert set(got) == {"x", "y"} and torch.equal(got["x"], a["module.x"]) and torch.equal(got["y"], b["module.y"])


def test_hf_folder_with_pytorch_model_bin(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    sd = {"bert.w": torch.randn(4, 4)}
    torch.save(sd, d / "pytorch_model.bin")
    got = dict(iter_tensors(d))
    assert torch.equal(got["bert.w"], sd["bert.w"])


def test_lfs_pointer(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert is_lfs_pointer(p)
    with pytest.raises(TrainauditError, match="Git LFS pointer"):
        list(iter_tensors(p))
    q = tmp_path / "x.pt"
    q.write_text(p.read_text())
    with pytest.raises(TrainauditError, match="Git LFS pointer"):
        list(iter_tensors(q))


def test_step_metadata_and_names(tmp_path: Path) -> None:
    p = tmp_path / "step_00000100.safetensors"
    save_file({"w": torch.ones(2)}, p, metadata={"step": "100", "config": json.dumps({"d": 4})})
    assert step_metadata(p) == {"step": "100", "config": '{"d": 4}'}
    q = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "iter_num": 2000, "best_val_loss": torch.tensor(1.5)}, q)
    assert step_metadata(q) == {"iter_num": 2000}
    assert [step_from_name(n) for n in ("step_00000100.safetensors", "checkpoint-500", "epoch=1-step=200.ckpt",
                                        "iter_2000.pt", "ckpt_30.pt", "model.pt")] == [100, 500, 200, 2000, 30, None]


def test_safetensors_written_by_the_library_pass_our_check(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.float64]
    tensors = {}
    for i in range(40):
        shape = tuple(int(x) for x in torch.randint(0, 5, (int(torch.randint(0, 4, (1,), generator=g)),),
                                                    generator=g))
        dt = dtypes[i % len(dtypes)]
        tensors[f"t{i}"] = (torch.randn(shape, generator=g) * 3).to(dt)
    p = tmp_path / "lib.safetensors"
    save_file(tensors, p, metadata={"k": "v"})
    header = check_safetensors_header(p)
    assert header["__metadata__"] == {"k": "v"}
    got = dict(iter_tensors(p))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_torch_zip_bytes_are_not_unpickled_by_the_listing(tmp_path: Path) -> None:
    """The static global listing reads data.pkl without running it (sanity of the refusal path)."""
    mark = tmp_path / "PWNED"
    p = tmp_path / "m.pt"
    torch.save({"x": Gadget(os.system, (f"touch {mark}",))}, p)
    with zipfile.ZipFile(p) as z:
        assert any(n.endswith("data.pkl") for n in z.namelist())
    with pytest.raises(TrainauditError):
        checkpoint_info(p)
    assert not mark.exists()


def test_read_safetensors_tensor_rows_and_recycled_buffer_match_the_file(tmp_path: Path) -> None:
    from loaders.safetensors_file import check_safetensors_header, read_safetensors_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 5, 3, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16),
               "e": torch.empty(0, 4)}
    p = tmp_path / "t.safetensors"
    save_file(tensors, str(p))
    header = check_safetensors_header(p)
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, ref in tensors.items():
            assert torch.equal(read_safetensors_tensor(f, 8 + n, p, name, header[name]), ref)
        a = tensors["a"]
        for start, stop in [(0, 37), (3, 10), (36, 37), (5, 5)]:
            got = read_safetensors_tensor(f, 8 + n, p, "a", header["a"], rows=(start, stop))
            assert torch.equal(got, a[start:stop])
        buf = torch.full((10_000,), 7, dtype=torch.uint8)
        got = read_safetensors_tensor(f, 8 + n, p, "a", header["a"], rows=(2, 9), out=buf)
        assert torch.equal(got, a[2:9]) and got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        with pytest.raises(TrainauditError, match="cannot read rows"):
            read_safetensors_tensor(f, 8 + n, p, "a", header["a"], rows=(30, 38))
    # a file cut short inside the tensor: the read says so instead of returning garbage
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(p.read_bytes()[:-40])
    with open(cut, "rb") as f, pytest.raises(TrainauditError, match="truncated"):
        read_safetensors_tensor(f, 8 + n, cut, "a", header["a"])


# --------------------------------------------------------------------------- recorded steps, duplicates

def test_recorded_step_sources_in_order(tmp_path: Path) -> None:
    """The checkpoint-N folder beats what the file says; the file's own step beats its name;
    accelerate's checkpoint_N is a save counter (its scheduler's last_epoch is the step)."""
    from loaders.checkpoint_layout import recorded_step

    hf = tmp_path / "out" / "checkpoint-200"
    hf.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, hf / "model.safetensors", metadata={"step": "7"})
    assert recorded_step(hf / "model.safetensors")[0] == 200 and recorded_step(hf)[0] == 200
    f = tmp_path / "step_5.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 200}, f)
    assert recorded_step(f) == (200, "global_step")
    torch.save({"model": {"w": torch.ones(2)}, "iter_num": 3000}, tmp_path / "ckpt.pt")
    assert recorded_step(tmp_path / "ckpt.pt") == (3000, "iter_num")
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors", metadata={"step": "300"})
    assert recorded_step(tmp_path / "a.safetensors")[0] == 300
    torch.save({"w": torch.ones(2)}, tmp_path / "iter_40.pt")
    assert recorded_step(tmp_path / "iter_40.pt") == (40, "file name")
    torch.save({"w": torch.ones(2)}, tmp_path / "final.pt")
    assert recorded_step(tmp_path / "final.pt") == (None, "")
    acc = tmp_path / "checkpoints" / "checkpoint_1"
    acc.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, acc / "model.safetensors")
    torch.save({"w": torch.ones(1)}, acc / "optimizer.bin")
    torch.save({"last_epoch": 64, "_step_count": 65, "base_lrs": [0.1]}, acc / "scheduler.bin")
    assert recorded_step(acc) == (64, "scheduler.bin last_epoch")
    (acc / "scheduler.bin").unlink()
    assert recorded_step(acc) == (None, "")  # never the 1 of checkpoint_1


def test_folder_of_checkpoints_steps_duplicates_and_file_order(tmp_path: Path) -> None:
    from loaders.detect import open_run

    d = tmp_path / "ck"
    d.mkdir()
    w200 = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3), "c": torch.full((2,), 2.0)}
    torch.save({"state_dict": w200, "global_step": 200}, d / "epoch=9-step=200.ckpt")
    torch.save({"state_dict": dict(w200), "global_step": 200}, d / "last.ckpt")   # same weights again
    torch.save({"state_dict": {k: v + 1 for k, v in w200.items()}, "global_step": 100}, d / "model.ckpt")
    run = open_run(d)
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(100, "model.ckpt"), (200, "epoch=9-step=200.ckpt")]
    assert not list(run.warnings)
    # Different weights at one recorded step: the named one kept, the other named in a warning.
    torch.save({"state_dict": {k: v * 3 for k, v in w200.items()}, "global_step": 200}, d / "last.ckpt")
    run = open_run(d)
    assert [c.path.name for c in run.checkpoints] == ["model.ckpt", "epoch=9-step=200.ckpt"]
    assert len(run.warnings) == 1 and "last.ckpt: records step 200" in run.warnings[0]
    # Nothing records a step: file order, with a warning.
    e = tmp_path / "bare"
    e.mkdir()
    for n in ("b.pt", "a.pt"):
        torch.save({"w": torch.ones(1)}, e / n)
    run = open_run(e)
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(0, "a.pt"), (1, "b.pt")]
    assert len(run.warnings) == 1 and "file order used as the step" in run.warnings[0]


def test_same_weights_is_a_content_check(tmp_path: Path) -> None:
    from loaders.checkpoint_layout import same_weights
    from loaders.run import CheckpointRef

    sd = {f"t{i}": torch.full((2, 2), float(i)) for i in range(5)}
    save_file(sd, tmp_path / "a.safetensors")
    torch.save({"model": sd}, tmp_path / "b.pt")     # the same weights in another container
    changed = dict(sd, t4=sd["t4"] + 1)              # the last tensor differs
    save_file(changed, tmp_path / "c.safetensors")
    ref = lambda n: CheckpointRef(1, tmp_path / n, "x")  # noqa: E731
    assert same_weights(ref("a.safetensors"), ref("b.pt"))
    assert not same_weights(ref("a.safetensors"), ref("c.safetensors"))
