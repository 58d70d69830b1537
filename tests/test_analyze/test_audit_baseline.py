"""`audit CKPT --baseline BASE`: relative change and sigma_1 per tensor against numpy/torch.linalg,
tensors added/removed/reshaped, across storage layouts (safetensors vs .pt, sharded vs single,
prefixed names), and the frozen_moved / family_moved rules on both sides of their thresholds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from analyze.cli.checkpoint import audit
from analyze.config import AnalysisConfig
from analyze.pipeline.audit import audit_checkpoint
from analyze.pipeline.baseline import match_names


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {f"h.{i}.{k}.weight": torch.randn(12, 8, generator=g) for i in range(3) for k in ("q", "k", "v", "o")}
    t |= {"wte.weight": torch.randn(20, 8, generator=g), "ln.bias": torch.zeros(8), "ln.weight": torch.ones(8),
          "steps": torch.arange(5), "old_head.weight": torch.randn(2, 8, generator=g)}
    return t


def moved(t: dict[str, torch.Tensor], rel: dict[str, float], seed: int = 1) -> dict[str, torch.Tensor]:
    """Each tensor plus a Gaussian of relative Frobenius size rel[family] (default 1e-2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, w in t.items():
        if not w.is_floating_point():
            out[n] = w.clone()
            continue
        d = torch.randn(w.shape, generator=g)
        size = next((v for k, v in rel.items() if f".{k}." in n), 1e-2)
        out[n] = w + d * (size * w.norm() / d.norm()) if w.norm() > 0 else w + 0.1 * d
    return out


def json_findings(args: list[str]) -> tuple[int, list[dict]]:
    res = CliRunner().invoke(audit, [*args, "--json"])
    return res.exit_code, json.loads(res.stdout) if res.stdout.strip() else []


def test_match_names_across_prefixes() -> None:
    a = ["transformer.h.0.w", "transformer.h.1.w", "transformer.wte.weight", "lm_head.weight"]
    b = ["h.0.w", "h.1.w", "wte.weight", "lm_head.weight", "pooler.w"]
    m, note = match_names(a, b)
    assert m == {"transformer.h.0.w": "h.0.w", "transformer.h.1.w": "h.1.w",
                 "transformer.wte.weight": "wte.weight", "lm_head.weight": "lm_head.weight"}
    assert "'transformer.'" in note and "checkpoint" in note
    m2, note2 = match_names(b, a)
    assert m2["h.0.w"] == "transformer.h.0.w" and "base" in note2
    assert match_names(b, b) == ({n: n for n in b}, "")


def test_changes_against_numpy_across_layouts_and_prefixes(tmp_path: Path) -> None:
    """Base: one safetensors file. Checkpoint: a torch file saved from DataParallel under a model key,
    with `transformer.` before every name, one tensor reshaped, one added, one removed."""
    base = base_tensors()
    save_file(base, tmp_path / "base.safetensors")
    new = moved(base, {"v": 0.05})
    new["wte.weight"] = torch.randn(22, 8)              # vocabulary grown: reshaped
    new["head.weight"] = torch.randn(3, 8)               # added
    del new["old_head.weight"]                           # removed
    torch.save({"model": {f"module.transformer.{k}": v for k, v in new.items()}, "step": 7}, tmp_path / "ft.pt")
    res = audit_checkpoint(tmp_path / "ft.pt", baseline=tmp_path / "base.safetensors")
    rows = {r.base_name or r.name: r for r in res.changes}
    for n, w0 in base.items():
        if n in ("wte.weight", "old_head.weight") or not w0.is_floating_point():
            continue
        r = rows[n]
        w = new[n].double().numpy()
        ref = np.linalg.norm(w - w0.double().numpy()) / np.linalg.norm(w0.double().numpy()) if w0.norm() > 0 else np.inf
        assert r.status == "changed" and r.name == f"transformer.{n}"
        assert r.rel_change == pytest.approx(ref, rel=1e-5)
        if w0.ndim == 2:
            assert r.sigma_before == pytest.approx(float(torch.linalg.matrix_norm(w0.double(), ord=2)), rel=1e-4)
            assert r.sigma_after == pytest.approx(float(torch.linalg.matrix_norm(new[n].double(), ord=2)), rel=1e-4)
    assert rows["wte.weight"].status == "reshaped" and rows["wte.weight"].base_shape == (20, 8)
    assert rows["old_head.weight"].status == "removed" and rows["transformer.head.weight"].status == "added"
    assert rows["steps"].status == "buffer" and rows["steps"].equal
    codes = {f.code for f in res.findings}
    assert {"baseline_names", "tensor_added", "tensor_removed", "tensor_reshaped", "weight_change",
            "moved_most"} <= codes
    (top,) = [f for f in res.findings if f.code == "moved_most"]
    v = {f"transformer.h.{i}.v.weight" for i in range(3)}  # moved 5%, the others 1%; ln.bias from zero: inf, left out
    assert top.tensor in v and top.value == pytest.approx(0.05, rel=1e-5)
    assert {part.split()[0] for part in top.message.split("; tensors ", 1)[1].split(", ")[:3]} == v
    assert rows["ln.bias"].rel_change == float("inf")
    layer = {i: np.sqrt(sum(np.linalg.norm(new[f"h.{i}.{k}.weight"].double().numpy() - base[f"h.{i}.{k}.weight"]
                                          .double().numpy()) ** 2 for k in "qkvo"))
             / np.sqrt(sum(np.linalg.norm(base[f"h.{i}.{k}.weight"].double().numpy()) ** 2 for k in "qkvo"))
             for i in range(3)}
    listed = dict(part.rsplit(" ", 1) for part in top.message.split("layers ", 1)[1].split("; ")[0].split(", "))
    for i in range(3):
        assert float(listed[f"transformer.h.{i}"]) == pytest.approx(layer[i], rel=1e-3)
    assert [f for f in res.findings if f.severity != "info"] == []


def test_sharded_checkpoint_against_a_single_file(tmp_path: Path) -> None:
    base = base_tensors()
    save_file(base, tmp_path / "base.safetensors")
    new = moved(base, {})
    d = tmp_path / "sharded"
    d.mkdir()
    names = sorted(new, reverse=True)                    # another order: the streams must still pair up
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        save_file({n: new[n] for n in part}, d / fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    code, findings = json_findings([str(d), "--baseline", str(tmp_path / "base.safetensors")])
    assert code == 0
    rel = {f["tensor"]: f["value"] for f in findings if f["code"] == "weight_change"}
    assert set(rel) == {n for n, w in base.items() if w.is_floating_point()}
    assert rel["h.1.q.weight"] == pytest.approx(1e-2, rel=1e-5)
    assert not any(f["code"].startswith("tensor_") for f in findings)


def test_frozen_moved_on_both_sides(tmp_path: Path) -> None:
    base = base_tensors()
    save_file(base, tmp_path / "base.safetensors")
    same = {k: v.clone() for k, v in base.items()}
    same["h.2.o.weight"] = base["h.2.o.weight"] + 1.0     # only this one moved
    save_file(same, tmp_path / "ft.safetensors")
    args = [str(tmp_path / "ft.safetensors"), "--baseline", str(tmp_path / "base.safetensors")]
    code, findings = json_findings([*args, "--frozen", "h.*.q.weight", "--frozen", "wte.*"])
    assert code == 0 and not [f for f in findings if f["severity"] != "info"]
    one_ulp = {k: v.clone() for k, v in same.items()}
    one_ulp["h.0.q.weight"][0, 0] = torch.nextafter(one_ulp["h.0.q.weight"][0, 0], torch.tensor(10.0))
    save_file(one_ulp, tmp_path / "ft2.safetensors")
    code, findings = json_findings([str(tmp_path / "ft2.safetensors"), *args[1:], "--frozen", "h.*.q.weight"])
    assert code == 1
    (f,) = [f for f in findings if f["severity"] != "info"]
    assert f["code"] == "frozen_moved" and f["tensor"] == "h.0.q.weight" and f["severity"] == "error"
    assert 0 < f["value"] < 1e-6 and f["threshold"] == 0.0
    code, findings = json_findings([*args, "--frozen", "encoder.*"])
    assert code == 0 and [f["code"] for f in findings if f["severity"] != "info"] == ["frozen_unmatched"]
    assert CliRunner().invoke(audit, [args[0], "--fail-on", "warning", *args[1:], "--frozen", "encoder.*"]).exit_code == 1


@pytest.mark.parametrize("factor, flagged", [(12.0, True), (8.0, False)])
def test_family_moved_on_both_sides(tmp_path: Path, factor: float, flagged: bool) -> None:
    base = {k: v for k, v in base_tensors().items() if k.startswith("h.")}   # families q, k, v, o
    save_file(base, tmp_path / "base.safetensors")
    save_file(moved(base, {"o": 1e-3 * factor, "q": 1e-3, "k": 1e-3, "v": 1e-3}), tmp_path / "ft.safetensors")
    res = audit_checkpoint(tmp_path / "ft.safetensors", baseline=tmp_path / "base.safetensors")
    found = [f for f in res.findings if f.code == "family_moved"]
    assert [f.tensor for f in found] == (["h.*.o.weight"] if flagged else [])
    if flagged:
        assert found[0].value == pytest.approx(factor, rel=1e-4) and found[0].threshold == 10.0
    loose = audit_checkpoint(tmp_path / "ft.safetensors", AnalysisConfig(family_moved_ratio=13.0),
                             baseline=tmp_path / "base.safetensors")
    assert not [f for f in loose.findings if f.code == "family_moved"]


def test_bad_base_exit_2_and_frozen_needs_baseline(tmp_path: Path) -> None:
    save_file(base_tensors(), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    res = CliRunner().invoke(audit, [str(tmp_path / "m.safetensors"), "--baseline", str(tmp_path / "bad.safetensors")])
    assert res.exit_code == 2 and "bad.safetensors" in res.stderr and "Traceback" not in res.output
    res = CliRunner().invoke(audit, [str(tmp_path / "m.safetensors"), "--frozen", "x"])
    assert res.exit_code == 2 and "--frozen needs --baseline" in res.output


def test_unrelated_base_is_a_warning(tmp_path: Path) -> None:
    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "base.safetensors")
    save_file({"a.weight": torch.randn(4, 5), "b.weight": torch.randn(3, 3)}, tmp_path / "m.safetensors")
    code, findings = json_findings([str(tmp_path / "m.safetensors"), "--baseline", str(tmp_path / "base.safetensors")])
    assert code == 0 and [f["code"] for f in findings if f["severity"] != "info"] == ["baseline_unrelated"]
    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "m2.safetensors")          # one partner: related
    code, findings = json_findings([str(tmp_path / "m2.safetensors"), "--baseline", str(tmp_path / "base.safetensors")])
    assert [f["code"] for f in findings if f["severity"] != "info"] == []
