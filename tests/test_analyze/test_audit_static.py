"""Static checks of `audit`: constant rows/columns named by the storage layout, family outliers of
sigma_1 and ||W||_F, integer buffers, the three planted defects, deterministic JSON, the text view.

Every rule is checked on both sides of its threshold; the pure functions against numpy loops.
The checkpoints are tiny GPT-2-shaped files (a few kB) whose matrices have one fixed spectrum per
family, so a family's median is known exactly and a planted scale k is a ratio of exactly k.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from analyze.cli.checkpoint import audit
from analyze.config import AnalysisConfig
from analyze.metrics.static import (count_constant_lines, family_key, family_medians, group_change, layer_key, outlier_side,
                                    relative_change)
from analyze.pipeline.audit import audit_checkpoint

REPO = Path(__file__).resolve().parents[2]
D, LAYERS, VOCAB, CTX = 16, 4, 64, 32


def fixed_spectrum(m: int, n: int, seed: int, top: float = 2.0) -> torch.Tensor:
    """U diag(top * 0.8^i) V^T: every matrix of one shape has the same sigma_1 and ||W||_F."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * (top * 0.8 ** torch.arange(k, dtype=torch.float64))) @ v.T).float()


def gpt2_tensors(conv1d: bool = True, n_layer: int = LAYERS) -> dict[str, torch.Tensor]:
    """GPT-2-shaped weights: Hugging Face Conv1D storage [in, out] (or nanoGPT's nn.Linear [out, in])."""
    def mat(i: int, n_in: int, n_out: int, seed: int) -> torch.Tensor:
        return fixed_spectrum(n_in, n_out, 100 * i + seed) if conv1d else fixed_spectrum(n_out, n_in, 100 * i + seed)
    t = {"wte.weight": fixed_spectrum(VOCAB, D, 1), "wpe.weight": fixed_spectrum(CTX, D, 2)}
    for i in range(n_layer):
        h = f"h.{i}."
        t |= {h + "ln_1.weight": torch.ones(D), h + "ln_1.bias": torch.zeros(D),
              h + "attn.c_attn.weight": mat(i, D, 3 * D, 3), h + "attn.c_attn.bias": torch.zeros(3 * D),
              h + "attn.c_proj.weight": mat(i, D, D, 4), h + "mlp.c_fc.weight": mat(i, D, 4 * D, 5),
              h + "mlp.c_proj.weight": mat(i, 4 * D, D, 6)}
    return t


def save(tmp: Path, t: dict[str, torch.Tensor], name: str = "m.safetensors") -> Path:
    p = tmp / name
    save_file({k: v.contiguous() for k, v in t.items()}, p)
    return p


def by_code(findings, code: str) -> list:  # type: ignore[no-untyped-def]
    return [f for f in findings if f.code == code]


def not_info(findings) -> list:  # type: ignore[no-untyped-def]
    return [f for f in findings if f.severity != "info"]


# --- the pure functions, against numpy loops ---------------------------------------------------

def test_count_constant_lines_against_a_numpy_loop() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 9, 7, generator=g)
    m[0, 2] = 0.0
    m[0, 5] = 0.25
    m[1, :, 3] = 0.0
    m[1, :, 6] = -1.5
    m[2, 4, :] = float("nan")           # a NaN row is not constant, and its NaN hides each column
    m[2, 1] = 0.0
    c = count_constant_lines(m)
    for b in range(3):
        a = m[b].numpy()
        rows = [np.all(r == r[0]) for r in a]
        cols = [np.all(col == col[0]) for col in a.T]
        assert int(c.zero_rows[b]) == sum(r and a[i, 0] == 0 for i, r in enumerate(rows))
        assert int(c.const_rows[b]) == sum(r and a[i, 0] != 0 for i, r in enumerate(rows))
        assert int(c.zero_cols[b]) == sum(k and a[0, j] == 0 for j, k in enumerate(cols))
        assert int(c.const_cols[b]) == sum(k and a[0, j] != 0 for j, k in enumerate(cols))
        assert c.first_rows[b] == tuple(i for i, r in enumerate(rows) if r)[:5]
        assert c.first_cols[b] == tuple(j for j, k in enumerate(cols) if k)[:5]
    assert [int(c.zero_rows[0]), int(c.const_rows[0]), int(c.zero_cols[1]), int(c.const_cols[1])] == [1, 1, 1, 1]
    many = torch.randn(2, 40, 3, generator=g)
    many[1, ::3] = 0.0                                      # 14 zero rows: the first 5 listed
    assert count_constant_lines(many).first_rows == [(), (0, 3, 6, 9, 12)]
    one_col = count_constant_lines(torch.zeros(5, 1))       # a line of one entry is not a line
    assert int(one_col.zero_rows) == -1 and int(one_col.zero_cols) == 1


def test_family_key_and_medians_against_numpy() -> None:
    assert family_key("encoder.layer.11.attention.self.query.weight") == "encoder.layer.*.attention.self.query.weight"
    assert family_key("layers.3.experts.7.w1") == "layers.*.experts.*.w1"
    assert family_key("0.weight") == "*.weight" and family_key("block10.w") == "block10.w"
    rng = np.random.default_rng(0)
    vals = rng.lognormal(size=40)
    vals[[3, 17]] = np.nan
    fams = [f"f{i % 6}" for i in range(40)]
    med, ratio, size = family_medians(vals, fams, 3)
    for i in range(40):
        members = np.array([vals[j] for j in range(40) if fams[j] == fams[i] and np.isfinite(vals[j])])
        assert med[i] == pytest.approx(np.median(members)) and size[i] == len(members)
        assert (np.isnan(ratio[i]) if np.isnan(vals[i]) else ratio[i] == pytest.approx(vals[i] / np.median(members)))
    _, r2, _ = family_medians([1.0, 50.0], ["a", "a"], 3)     # two members: not judged
    assert np.isnan(r2).all()
    assert (outlier_side(5.01, 5), outlier_side(4.99, 5), outlier_side(0.19, 5), outlier_side(0.21, 5),
            outlier_side(math.nan, 5)) == (1, 0, -1, 0, 0)


def test_layer_key_and_group_change_against_numpy() -> None:
    assert layer_key("bert.encoder.layer.5.attention.self.query.weight") == "bert.encoder.layer.5"
    assert layer_key("wte.weight") == "wte" and layer_key("h.0.w") == "h.0"
    diff, base = np.array([1.0, 2.0, 3.0, np.nan]), np.array([2.0, 2.0, 4.0, 1.0])
    got = group_change(diff, base, ["a", "a", "b", "b"])
    assert got["a"] == pytest.approx(np.sqrt(1 + 4) / np.sqrt(4 + 4)) and got["b"] == pytest.approx(3 / 4)


def test_relative_change_against_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(30, 20, generator=g)
    w = w0 + 0.01 * torch.randn(30, 20, generator=g)
    ref = np.linalg.norm(w.double().numpy() - w0.double().numpy()) / np.linalg.norm(w0.double().numpy())
    assert relative_change(w, w0) == pytest.approx(ref, rel=1e-6)
    assert relative_change(w0, w0) == 0.0
    assert relative_change(torch.ones(3), torch.zeros(3)) == math.inf
    assert relative_change(w0.to(torch.bfloat16), w0.to(torch.bfloat16)) == 0.0
    bad = w0.clone()
    bad[3, 4] = float("nan")
    assert math.isnan(relative_change(bad, w0)) and math.isnan(relative_change(w0, bad))
    big = torch.randn(3 * (1 << 20) + 7, generator=g)          # several blocks, against float64 numpy
    big0 = big + 1e-3 * torch.randn(big.shape, generator=g)
    ref = np.linalg.norm(big.double().numpy() - big0.double().numpy()) / np.linalg.norm(big0.double().numpy())
    assert relative_change(big, big0) == pytest.approx(ref, rel=1e-5)


# --- constant rows and columns ---------------------------------------------------------------

@pytest.mark.parametrize("n_dead", [0, 1, 7])
def test_dead_units_in_conv1d_storage_are_columns(tmp_path: Path, n_dead: int) -> None:
    t = gpt2_tensors(conv1d=True)
    t["h.1.mlp.c_fc.weight"][:, 10:10 + n_dead] = 0.0
    t["h.2.mlp.c_fc.weight"][:, 5] = 0.0
    t["h.2.mlp.c_fc.weight"][3, 5] = 1e-30          # one non-zero entry: the unit is alive
    res = audit_checkpoint(save(tmp_path, t))
    found = by_code(res.findings, "zero_rows_cols")
    if n_dead == 0:
        assert found == [] and not_info(res.findings) == []
        return
    assert [f.tensor for f in found] == ["h.1.mlp.c_fc.weight"]
    f = found[0]
    assert f.severity == "warning" and f.value == n_dead and f.threshold == 0.0
    assert f"{n_dead} of {4 * D} columns" in f.message and "dead units" in f.message and "Conv1D" in f.message
    assert f"(at index {', '.join(str(10 + i) for i in range(min(n_dead, 5)))}" in f.message


def test_dead_units_in_linear_storage_are_rows_and_unused_inputs_columns(tmp_path: Path) -> None:
    t = gpt2_tensors(conv1d=False)                   # nanoGPT: c_attn [3d, d] means nn.Linear [out, in]
    t["h.0.mlp.c_fc.weight"][[2, 9, 40]] = 0.0       # 3 of 64 units get no input
    t["h.3.mlp.c_proj.weight"][:, 7] = 0.0           # input 7 of 64 read by no unit
    found = {f.tensor: f for f in by_code(audit_checkpoint(save(tmp_path, t)).findings, "zero_rows_cols")}
    assert set(found) == {"h.0.mlp.c_fc.weight", "h.3.mlp.c_proj.weight"}
    assert found["h.0.mlp.c_fc.weight"].value == 3
    assert "3 of 64 rows (output units, nn.Linear" in found["h.0.mlp.c_fc.weight"].message
    assert "dead units" in found["h.0.mlp.c_fc.weight"].message
    assert "1 of 64 columns (inputs, nn.Linear" in found["h.3.mlp.c_proj.weight"].message
    assert "unused inputs" in found["h.3.mlp.c_proj.weight"].message


@pytest.mark.parametrize("model_type, layout", [("gpt2", "Conv1D"), ("bert", "nn.Linear")])
def test_layout_from_config_json(tmp_path: Path, model_type: str, layout: str) -> None:
    """Without a fused c_attn to read the layout from, config.json's model_type decides."""
    t = {f"h.{i}.mlp.c_fc.weight": fixed_spectrum(D, 4 * D, i) for i in range(3)}
    t["h.1.mlp.c_fc.weight"][:, 0] = 0.0
    save(tmp_path, t, "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (f,) = by_code(audit_checkpoint(tmp_path).findings, "zero_rows_cols")
    assert f"of {4 * D} columns" in f.message and layout in f.message
    assert ("dead units" in f.message) == (layout == "Conv1D")


def test_constant_nonzero_lines_and_embedding_rows(tmp_path: Path) -> None:
    t = gpt2_tensors()
    t["h.1.attn.c_proj.weight"][4] = 0.5                       # a constant, non-zero row
    t["wte.weight"][0] = 0.0                                    # one padding row: info
    res = audit_checkpoint(save(tmp_path, t))
    f = {x.tensor: x for x in by_code(res.findings, "zero_rows_cols")}
    assert f["h.1.attn.c_proj.weight"].severity == "warning" and "constant" in f["h.1.attn.c_proj.weight"].message
    assert f["wte.weight"].severity == "info" and "embedding" in f["wte.weight"].message
    t["wte.weight"][1] = 0.0                                    # two: above embedding_zero_rows_ok = 1
    p = save(tmp_path, t, "two.safetensors")
    (two,) = [x for x in by_code(audit_checkpoint(p).findings, "zero_rows_cols") if x.tensor == "wte.weight"]
    assert two.severity == "warning" and two.value == 2 and two.threshold == 1
    (ok,) = [x for x in by_code(audit_checkpoint(p, AnalysisConfig(embedding_zero_rows_ok=2)).findings,
                                "zero_rows_cols") if x.tensor == "wte.weight"]
    assert ok.severity == "info"


def test_integer_buffers_are_never_weights(tmp_path: Path) -> None:
    t = gpt2_tensors()
    for i in range(LAYERS):
        t[f"h.{i}.attn.steps"] = torch.zeros(4, 4, dtype=torch.int64) + (100 if i == 2 else 0)
        t[f"h.{i}.mask"] = torch.ones(8, 8, dtype=torch.bool)
    t["position_ids"] = torch.arange(CTX).unsqueeze(0)
    res = audit_checkpoint(save(tmp_path, t))
    assert not_info(res.findings) == []
    assert {f.tensor for f in res.findings if f.code in ("spectral_norm", "zero_rows_cols")}.isdisjoint(
        {n for n in t if not t[n].is_floating_point()})
    (note,) = by_code(res.findings, "no_spectral_norm")
    assert "position_ids" in note.message or note.value >= 9


# --- family outliers -------------------------------------------------------------------------

@pytest.mark.parametrize("scale, flagged", [(5.5, True), (4.5, False), (1 / 5.5, True), (1 / 4.5, False)])
def test_family_outlier_on_both_sides_of_the_threshold(tmp_path: Path, scale: float, flagged: bool) -> None:
    t = gpt2_tensors()
    t["h.2.attn.c_proj.weight"] *= scale
    p = save(tmp_path, t)
    cfg = AnalysisConfig()
    assert cfg.spectral_outlier_ratio == cfg.norm_outlier_ratio == 5.0
    for code, only in (("spectral_outlier", AnalysisConfig(norm_outlier_ratio=1e9)),
                       ("norm_outlier", AnalysisConfig(spectral_outlier_ratio=1e9))):
        res = audit_checkpoint(p, only)
        found = by_code(res.findings, code)
        assert [f.code for f in not_info(res.findings)] == ([code] if flagged else [])
        if flagged:
            (f,) = found
            assert f.tensor == "h.2.attn.c_proj.weight" and f.value == pytest.approx(scale, rel=1e-5)
            assert f.threshold == pytest.approx(5.0 if scale > 1 else 0.2)
            assert "h.*.attn.c_proj.weight [16, 16]" in f.message and "(4 tensors)" in f.message
    strict = audit_checkpoint(p, AnalysisConfig(spectral_outlier_ratio=4.0, norm_outlier_ratio=4.0))
    assert {f.code for f in not_info(strict.findings)} == {"spectral_outlier", "norm_outlier"}


def test_family_outlier_needs_three_members_of_one_shape(tmp_path: Path) -> None:
    t = gpt2_tensors(n_layer=2)
    t["h.1.attn.c_proj.weight"] *= 50
    assert not_info(audit_checkpoint(save(tmp_path, t)).findings) == []
    t = gpt2_tensors(n_layer=3)
    t["h.1.attn.c_proj.weight"] *= 50
    t["h.2.attn.c_proj.weight"] = fixed_spectrum(D, D + 1, 7) * 50       # another shape: another family
    found = not_info(audit_checkpoint(save(tmp_path, t, "b.safetensors")).findings)
    assert {f.tensor for f in found} == set()  # h.0 and h.1 only share a shape: two members, not judged


# --- the three planted defects, end to end ---------------------------------------------------

def test_three_planted_defects_and_the_clean_file(tmp_path: Path) -> None:
    clean = gpt2_tensors()
    assert CliRunner().invoke(audit, [str(save(tmp_path, clean, "clean.safetensors")), "--fail-on",
                                      "warning"]).exit_code == 0
    t = {k: v.clone() for k, v in clean.items()}
    dead = round(0.3 * 4 * D)
    t["h.2.mlp.c_fc.weight"][:, torch.randperm(4 * D, generator=torch.Generator().manual_seed(0))[:dead]] = 0.0
    t["h.1.mlp.c_proj.weight"][3, 4] = float("nan")
    t["h.3.attn.c_proj.weight"] *= 50
    res = CliRunner().invoke(audit, [str(save(tmp_path, t, "bad.safetensors")), "--json"])
    assert res.exit_code == 1
    findings = json.loads(res.stdout)
    flagged = {f["tensor"] for f in findings if f["severity"] != "info"}
    assert flagged == {"h.2.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "h.3.attn.c_proj.weight"}
    (z,) = [f for f in findings if f["code"] == "zero_rows_cols"]
    assert z["value"] == dead and "dead units" in z["message"]
    assert [f["code"] for f in findings if f["tensor"] == "h.1.mlp.c_proj.weight" and f["severity"] != "info"] \
        == ["nonfinite_tensor"]
    outl = {f["code"]: f["value"] for f in findings if f["tensor"] == "h.3.attn.c_proj.weight" and f["severity"] != "info"}
    assert outl == {"spectral_outlier": pytest.approx(50, rel=1e-5), "norm_outlier": pytest.approx(50, rel=1e-5)}


def test_json_is_byte_identical_across_runs(tmp_path: Path) -> None:
    t = gpt2_tensors()
    t["h.3.attn.c_proj.weight"] *= 50
    t["h.0.mlp.c_fc.weight"][:, :3] = 0.0
    p = save(tmp_path, t)
    outs = [subprocess.run([sys.executable, "-m", "analyze", "audit", str(p), "--json"], capture_output=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120).stdout
            for _ in range(2)]
    assert outs[0] and outs[0] == outs[1]
    assert all(list(f) == sorted(f) for f in json.loads(outs[0]))


def test_text_view_lists_errors_and_warnings_then_one_info_line(tmp_path: Path) -> None:
    t = gpt2_tensors()
    t["h.3.attn.c_proj.weight"] *= 50
    t["h.0.attn.c_attn.weight"][0, 0] = float("inf")
    p = save(tmp_path, t)
    res = CliRunner().invoke(audit, [str(p)])
    lines = res.stdout.splitlines()
    assert res.exit_code == 1
    assert [ln.split()[:2] for ln in lines[1:4]] == [["ERROR", "nonfinite_tensor"], ["WARNING", "spectral_outlier"],
                                                     ["WARNING", "norm_outlier"]]
    assert not any(ln.split()[0] == "INFO" for ln in lines[1:])
    (summary,) = [ln for ln in lines if "info findings" in ln]
    assert "--verbose" in summary and "--json" in summary and "spectral_norm" in summary
    assert lines[-1].startswith("1 error(s), 2 warning(s), ")
    verbose = CliRunner().invoke(audit, [str(p), "--verbose"]).stdout.splitlines()
    n_info = int(lines[-1].split()[-2])
    assert sum(ln.split()[0] == "INFO" for ln in verbose[1:-1]) == n_info
