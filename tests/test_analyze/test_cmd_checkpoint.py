"""`trainaudit audit` and `trainaudit spectral` through click's CliRunner: exit codes, JSON shapes,
and spectral norms against torch.linalg.matrix_norm(ord=2) (§4, §12)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from analyze.config import AnalysisConfig
from analyze.pipeline.audit import SPECTRAL_JSON_KEYS
from analyze.cli.checkpoint import audit, spectral


def _decaying(m: int, n: int, seed: int, top: float = 3.0, decay: float = 0.8) -> torch.Tensor:
    """A matrix with singular values top * decay^i (trained weights decay; Gaussian ones do not)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = top * decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    t = {"emb.weight": _decaying(300, 160, 0).float(), "fc.weight": _decaying(200, 150, 1, top=2.0).float(),
         "conv.weight": torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(2)),
         "small.weight": _decaying(6, 4, 3).float(), "fc.bias": torch.zeros(200),
         "steps": torch.arange(4)}
    p = tmp_path_factory.mktemp("ckpt") / "step_00000100.safetensors"
    save_file(t, p, metadata={"step": "100"})
    return p, t


def _run(cmd, args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cmd, args)


def test_audit_healthy_exit_0_and_json_shape(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    p, t = healthy
    res = _run(audit, [str(p), "--json"])
    assert res.exit_code == 0, res.output
    findings = json.loads(res.stdout)
    assert all({"severity", "code", "message", "step", "tensor", "value"} <= set(f) for f in findings)
    assert {f["severity"] for f in findings} == {"info"}
    sig = {f["tensor"]: f["value"] for f in findings if f["code"] == "spectral_norm"}
    assert set(sig) == {"emb.weight", "fc.weight", "conv.weight", "small.weight"}
    for name, value in sig.items():
        w = t[name].double().reshape(t[name].shape[0], -1)
        exact = float(torch.linalg.matrix_norm(w, ord=2))
        assert abs(value - exact) / exact <= 1e-3, name
        sr = {f["tensor"]: f["value"] for f in findings if f["code"] == "stable_rank"}[name]
        assert sr == pytest.approx(float(torch.linalg.matrix_norm(w) ** 2) / exact**2, rel=2e-3)
    assert all(f["step"] == 100 for f in findings)
    assert any(f["code"] == "no_spectral_norm" and "fc.bias" in f["message"] for f in findings)


def test_audit_text_output(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    res = _run(audit, [str(healthy[0])])
    assert res.exit_code == 0
    assert "6 tensors" in res.stdout and "0 error(s), 0 warning(s)" in res.stdout


def test_audit_nonfinite_is_an_error(tmp_path: Path) -> None:
    w = torch.randn(5, 5)
    w[1, 2] = float("nan")
    w[3, 3] = float("inf")
    p = tmp_path / "bad.safetensors"
    save_file({"w": w, "ok": torch.eye(3), "half": torch.randn(4, 4).to(torch.bfloat16)}, p)
    res = _run(audit, [str(p), "--json"])
    assert res.exit_code == 1
    bad = [f for f in json.loads(res.stdout) if f["code"] == "nonfinite_tensor"]
    assert len(bad) == 1 and bad[0]["severity"] == "error" and bad[0]["tensor"] == "w" and bad[0]["value"] == 2.0


def test_audit_fail_on_levels(tmp_path: Path) -> None:
    w = torch.eye(4)
    w[0, 0] = 10 * AnalysisConfig().max_abs_warn
    p = tmp_path / "big.safetensors"
    save_file({"w": w}, p)
    res = _run(audit, [str(p), "--json"])
    codes = {f["code"]: f["severity"] for f in json.loads(res.stdout)}
    assert codes["large_weights"] == "warning" and codes["large_spectral_norm"] == "warning"
    assert res.exit_code == 0                      # default --fail-on error
    assert _run(audit, [str(p), "--fail-on", "warning"]).exit_code == 1
    assert _run(audit, [str(p), "--fail-on", "error"]).exit_code == 0


def test_audit_empty_and_zero_rank(tmp_path: Path) -> None:
    p = tmp_path / "edge.safetensors"
    save_file({"empty": torch.zeros(0, 16), "scalar": torch.tensor(2.0)}, p)
    res = _run(audit, [str(p), "--json", "--fail-on", "warning"])
    assert res.exit_code == 0
    assert any(f["code"] == "empty_tensor" and f["tensor"] == "empty" for f in json.loads(res.stdout))


@pytest.mark.parametrize("payload, problem", [
    (b"", "file too small to be safetensors"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00[1,2,3]         ", "not an object"),
])
def test_audit_unreadable_exit_2_one_line(tmp_path: Path, payload: bytes, problem: str) -> None:
    p = tmp_path / "m.safetensors"
    p.write_bytes(payload)
    for cmd in (audit, spectral):
        res = _run(cmd, [str(p)])
        assert res.exit_code == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"trainaudit: error: {p}: ") and problem in lines[0]
        assert "Traceback" not in res.output


def test_audit_gadget_checkpoint_exit_2_nothing_runs(tmp_path: Path) -> None:
    mark = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return os.system, (f"touch {mark}",)

    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2, 2), "x": Evil()}, p)
    res = _run(audit, [str(p)])
    assert res.exit_code == 2 and "unsupported global posix.system (not loaded)" in res.stderr
    assert not mark.exists()


def test_audit_missing_shard_reports_partial_then_exit_2(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.eye(3)}, d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    res = _run(audit, [str(d), "--json"])
    assert res.exit_code == 2
    findings = json.loads(res.stdout)
    assert any(f["code"] == "spectral_norm" and f["tensor"] == "a" and f["value"] == pytest.approx(1.0)
               for f in findings)
    assert any(f["code"] == "unreadable" and "model-00002-of-00002.safetensors" in f["message"] for f in findings)


def test_spectral_exact_against_matrix_norm(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    p, t = healthy
    res = _run(spectral, [str(p), "--exact", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [tuple(r) for r in rows] == [SPECTRAL_JSON_KEYS] * len(rows)
    assert {r["tensor"] for r in rows} == {"emb.weight", "fc.weight", "conv.weight", "small.weight"}
    for r in rows:
        w = t[r["tensor"]]
        assert r["shape"] == list(w.shape)
        m = w.double().reshape(w.shape[0], -1)
        exact = float(torch.linalg.matrix_norm(m, ord=2))
        s = torch.linalg.svdvals(m)
        assert r["sigma_exact"] == pytest.approx(exact, rel=1e-6)
        assert r["rel_err"] == pytest.approx(abs(r["sigma_est"] - exact) / exact, rel=1e-3, abs=1e-12)
        assert r["rel_err"] <= 1e-3 and r["err_bound"] >= 0
        assert r["sigma_est"] <= exact * (1 + 1e-5) and r["sigma_power"] <= exact * (1 + 1e-5)
        assert r["power_rel_err"] == pytest.approx(abs(r["sigma_power"] - exact) / exact, rel=1e-3, abs=1e-12)
        assert r["sigma_ratio"] == pytest.approx(float(s[1] / s[0]), rel=1e-6)
        assert isinstance(r["iterations"], int)


def test_spectral_json_without_exact_has_nulls(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    res = _run(spectral, [str(healthy[0]), "--json"])
    rows = json.loads(res.stdout)
    assert rows and all(r[k] is None for r in rows for k in ("sigma_exact", "rel_err", "power_rel_err", "sigma_ratio"))
    assert all(isinstance(r["sigma_est"], float) and r["sigma_power"] > 0 for r in rows)


def test_spectral_methods_and_tol(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    p, t = healthy
    exact_fc = float(torch.linalg.matrix_norm(t["fc.weight"].double(), ord=2))
    for method in ("exact", "lanczos"):
        rows = {r["tensor"]: r for r in json.loads(_run(spectral, [str(p), "--json", "--method", method]).stdout)}
        assert rows["fc.weight"]["method"] == method
        assert rows["fc.weight"]["sigma_est"] == pytest.approx(exact_fc, rel=1e-4)
    loose = {r["tensor"]: r for r in json.loads(_run(spectral, [str(p), "--json", "--tol", "0.1"]).stdout)}
    tight = {r["tensor"]: r for r in json.loads(_run(spectral, [str(p), "--json", "--tol", "1e-6"]).stdout)}
    assert loose["emb.weight"]["iterations"] <= tight["emb.weight"]["iterations"]
    assert _run(spectral, [str(p), "--method", "svd"]).exit_code == 2  # click usage error


def test_spectral_table(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    res = _run(spectral, [str(healthy[0]), "--exact"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["tensor", "shape", "method", "sigma_est"] and "sigma_exact" in lines[0]
    assert any(ln.startswith("emb.weight") and "300x160" in ln for ln in lines)


def test_nonfinite_matrix_in_spectral(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.full((3, 3), float("nan"))}, p)
    rows = json.loads(_run(spectral, [str(p), "--json", "--exact"]).stdout)
    assert rows[0]["method"] == "non-finite" and rows[0]["sigma_est"] is None


def test_registered_on_the_trainaudit_group(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    cli = pytest.importorskip("analyze.cli")
    res = CliRunner().invoke(cli.main, ["audit", str(healthy[0]), "--fail-on", "warning"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli.main, ["spectral", str(healthy[0]), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 4


def test_spectral_command_imports_no_pandas(healthy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The checkpoint commands read weights only: pandas (loaders.run's tables) costs a third of a
    second of start-up and is not imported on their path."""
    import subprocess
    import sys

    code = ("import sys\nfrom analyze.cli import main\n"
            f"try:\n    main(['spectral', {str(healthy[0])!r}, '--json'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('pandas', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"
