"""analyze_run end to end: synthetic runs with planted events (checked against numpy) and the tiny
demo run (panel numbers checked against the metric functions and plain torch called directly)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from analyze.pipeline.cache import CheckpointCache
from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run
from analyze.pipeline.tables import TABLE_COLUMNS, validate_summary
from loaders.run import CheckpointRef, Run

def _matrix(m: int, n: int, s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = len(s)
    return (u[:, :k] * s) @ v[:, :k].T


def _class_state(x: np.ndarray) -> tuple[int, float, float]:
    return len(x), float(x.sum()), float(((x - x.mean()) ** 2).sum()) if len(x) else 0.0


def make_run(tmp: Path, *, steps: int = 300, n_ckpt: int = 3, spike_at: int | None = 200,
             nan_at: int | None = None, name: str = "synthetic",
             class_names: tuple[str, str] = ("regular", "irregular")) -> tuple[Run, dict]:
    """A run with known truths: loss spike at `spike_at`, validation minimum at step 160 followed by
    a 20% rise while training loss falls (overfitting), per-example class losses, and checkpoints
    holding one 64x32 matrix of chosen spectrum (perturbed between checkpoints) plus a bias."""
    rng = np.random.default_rng(7)
    st = np.arange(steps)
    loss = 3.0 * np.exp(-st / 80.0) + 0.5 + 0.01 * rng.standard_normal(steps)
    if spike_at is not None:
        loss[spike_at] += 2.0
    if nan_at is not None:
        loss[nan_at] = np.nan
    grad = 1.0 + 0.02 * rng.standard_normal(steps)
    scalars = pd.concat([pd.DataFrame({"step": st, "series": "loss", "value": loss}),
                         pd.DataFrame({"step": st, "series": "grad_norm", "value": grad})], ignore_index=True)
    ev_steps = np.arange(0, steps, 20)
    val = np.where(ev_steps <= 160, 3.0 * np.exp(-ev_steps / 80.0) + 0.9,
                   (3.0 * np.exp(-160 / 80.0) + 0.9) * (1 + 0.2 * (ev_steps - 160) / 140))
    evals = pd.DataFrame({"step": ev_steps, "series": "val", "loss": val})
    # per-example losses: 8 examples per class per step; irregular harder by 0.5 nats
    per_ex = {c: 1.0 + 0.5 * i + 0.3 * rng.standard_normal((steps, 8)) for i, c in enumerate(class_names)}
    rows = []
    for s in range(steps):
        for c in class_names:
            n, tot, m2 = _class_state(per_ex[c][s])
            rows.append({"step": s, "cls": c, "count": n, "loss_sum": tot, "loss_m2": m2})
    class_losses = pd.DataFrame(rows)
    ck_dir = tmp / "checkpoints"
    ck_dir.mkdir(parents=True, exist_ok=True)
    w = _matrix(64, 32, np.linspace(2.0, 0.1, 32) * np.r_[1.0, np.full(31, 0.5)], rng)
    weights, refs = [], []
    for j in range(n_ckpt):
        step = j * (steps // max(1, n_ckpt - 1)) if n_ckpt > 1 else 0
        wj = w + 0.01 * j * rng.standard_normal(w.shape)
        weights.append(wj)
        p = ck_dir / f"step_{step:08d}.safetensors"
        save_file({"layer.weight": torch.tensor(wj, dtype=torch.float32),
                   "layer.bias": torch.zeros(64)}, str(p))
        refs.append(CheckpointRef(step, p, "safetensors"))
    run = Run(path=tmp, name=name, source_format="synthetic", scalars=scalars, evals=evals,
              class_losses=class_losses, checkpoints=refs, class_names=list(class_names))
    return run, {"per_ex": per_ex, "weights": weights, "refs": refs, "val": val, "ev_steps": ev_steps}


def _columns_ok(tables: dict[str, pd.DataFrame]) -> None:
    assert set(tables) == set(TABLE_COLUMNS)
    for name, cols in TABLE_COLUMNS.items():
        assert tuple(tables[name].columns) == cols, name


def test_synthetic_run_tables_match_numpy(tmp_path: Path) -> None:
    run, truth = make_run(tmp_path)
    res = analyze_run(run, AnalysisConfig(exact_svd=True, class_window=50))
    _columns_ok(res.tables)
    assert validate_summary(res.summary) == []

    # spectral: exact sigma_1 against numpy SVD (float32 storage -> compare with the stored matrix)
    sp = res.tables["spectral"].sort_values("step").reset_index(drop=True)
    assert list(sp["tensor"]) == ["layer.weight"] * 3  # the 1-D bias is skipped ...
    assert any("layer.bias" in n and "no spectral norm" in n for n in res.notes)  # ... and said so
    for j, ref in enumerate(truth["refs"]):
        stored = load_file(str(ref.path))["layer.weight"].double().numpy()
        s = np.linalg.svd(stored, compute_uv=False)
        row = sp.iloc[j]
        assert row["sigma_exact"] == pytest.approx(s[0], rel=1e-9)
        assert row["sigma2_exact"] == pytest.approx(s[1], rel=1e-9)
        assert row["sigma_ratio"] == pytest.approx(s[1] / s[0], rel=1e-9)
        assert abs(row["sigma_est"] - s[0]) / s[0] <= 1e-3
        assert row["sigma_est"] <= s[0] * (1 + 1e-6)
        assert row["stable_rank"] == pytest.approx((stored ** 2).sum() / s[0] ** 2, rel=1e-6)
        assert row["rel_err"] == pytest.approx(abs(row["sigma_est"] - s[0]) / s[0], rel=1e-6, abs=1e-12)
    # warm start chained from the previous checkpoint, for the sheet's power iteration
    assert list(sp["power_warm_start"]) == [False, True, True]

    # update ratio ||W_j - W_{j-1}||_F / ||W_{j-1}||_F, and per step elapsed
    ur = res.tables["update_ratio"].sort_values("step").reset_index(drop=True)
    assert len(ur) == 2
    for j in (1, 2):
        a = load_file(str(truth["refs"][j].path))["layer.weight"].double().numpy()
        b = load_file(str(truth["refs"][j - 1].path))["layer.weight"].double().numpy()
        expect = np.linalg.norm(a - b) / np.linalg.norm(b)
        # float32 difference and 1024-element float32 partial norms (analyze.metrics.gradients.update_sums): ~1e-7
        assert ur.loc[j - 1, "update_ratio"] == pytest.approx(expect, rel=1e-6)
        steps = truth["refs"][j].step - truth["refs"][j - 1].step
        assert ur.loc[j - 1, "update_ratio_per_step"] == pytest.approx(expect / steps, rel=1e-6)

    # per-class windows: tau and Welch SE over the raw per-example losses of each 50-step window
    tau = res.tables["tau"]
    tr = tau[tau["source"] == "train"].reset_index(drop=True)
    assert len(tr) == 6
    for i, row in tr.iterrows():
        lo = int(row["step"]) - 49
        hard = truth["per_ex"]["irregular"][lo: lo + 50].ravel()
        easy = truth["per_ex"]["regular"][lo: lo + 50].ravel()
        assert (row["class_a"], row["class_b"]) == ("irregular", "regular")
        assert row["tau"] == pytest.approx(hard.mean() - easy.mean(), rel=1e-10, abs=1e-12)
        se = math.sqrt(hard.var(ddof=1) / hard.size + easy.var(ddof=1) / easy.size)
        assert row["se"] == pytest.approx(se, rel=1e-9)
        assert (row["n_a"], row["n_b"]) == (hard.size, easy.size)
    cl = res.tables["class_losses"]
    first = cl[(cl["source"] == "train") & (cl["step"] == 49) & (cl["cls"] == "regular")].iloc[0]
    assert first["std"] == pytest.approx(truth["per_ex"]["regular"][:50].std(ddof=1), rel=1e-9)
    assert res.summary["tau"]["final"] == pytest.approx(tr["tau"].iloc[-1])

    # the planted loss spike, and the §10 verdict on a curve built to overfit
    spikes = res.tables["spikes"]
    loss_spikes = spikes[(spikes["series"] == "loss") & (spikes["kind"] == "spike")]
    assert list(loss_spikes["peak_step"]) == [200]
    assert {"series": "loss", "kind": "spike", "first_step": 200, "peak_step": 200, "length": 1}.items() <= \
        res.summary["spikes"][0].items()
    of = res.summary["overfitting"]
    assert of["verdict"] == "overfitting" and of["val_min_step"] == 160 and of["val_series"] == "val"
    gl = 100 * (truth["val"] / np.minimum.accumulate(truth["val"]) - 1)
    assert of["gl5_step"] == int(truth["ev_steps"][np.flatnonzero(gl > 5)[0]])
    codes = [f.code for f in res.findings]
    assert "overfitting" in codes and "loss_spike" in codes

    # no model named: the model panels say why instead of vanishing
    for p in ("activations", "dead_neurons", "attention"):
        assert "--model" in res.panels[p] or "--eval-data" in res.panels[p]
    assert res.tables["activations"].empty


def test_nonfinite_loss_and_unreadable_checkpoint(tmp_path: Path) -> None:
    run, truth = make_run(tmp_path, spike_at=None, nan_at=250)
    bad = tmp_path / "checkpoints" / "step_00000999.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    run.checkpoints.insert(1, CheckpointRef(140, bad, "safetensors"))
    nan_w = torch.ones(8, 4)
    nan_w[2, 1] = float("nan")
    nan_ck = tmp_path / "checkpoints" / "step_00000400.safetensors"
    save_file({"layer.weight": nan_w}, str(nan_ck))
    run.checkpoints.append(CheckpointRef(400, nan_ck, "safetensors"))
    res = analyze_run(run, AnalysisConfig(exact_svd=True))
    bad_w = [f for f in res.findings if f.code == "nonfinite_weights"]
    assert [(f.severity, f.tensor, f.step) for f in bad_w] == [("error", "layer.weight", 400)]
    row = res.tables["spectral"].query("step == 400").iloc[0]
    assert not row["finite"] and np.isnan(float(row["sigma_est"]))
    nonfin = [f for f in res.findings if f.code == "nonfinite_loss"]
    assert len(nonfin) == 1 and nonfin[0].step == 250 and nonfin[0].severity == "error"
    assert res.findings[0].severity == "error"  # errors are listed first
    # partial kept: the corrupt checkpoint is a data warning, the other three are analysed
    assert sorted(res.tables["spectral"]["step"]) == [0, 150, 300, 400]
    assert any("step 140 skipped" in w for w in res.data_warnings)
    assert any(f.code == "data_warnings" for f in res.findings)


def test_cache_serves_unchanged_checkpoints_and_invalidates_changed_ones(tmp_path: Path) -> None:
    run, truth = make_run(tmp_path / "run")
    cache = tmp_path / "cache"
    cfg = AnalysisConfig(exact_svd=True)
    first = analyze_run(run, cfg, cache_dir=cache)
    assert (first.cache_hits, first.cache_misses) == (0, 3)
    second = analyze_run(run, cfg, cache_dir=cache)
    assert (second.cache_hits, second.cache_misses) == (3, 0)
    assert any("served from the cache" in n and "nothing recomputed" in n for n in second.notes)
    for name in ("spectral", "update_ratio"):
        pd.testing.assert_frame_equal(first.tables[name], second.tables[name], check_dtype=False)
    # touching the middle checkpoint invalidates it and the one after it (the warm start chains them)
    mid = truth["refs"][1].path
    st = mid.stat()
    os.utime(mid, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    third = analyze_run(run, cfg, cache_dir=cache)
    assert (third.cache_hits, third.cache_misses) == (1, 2)
    # a setting that changes per-checkpoint results invalidates everything
    fourth = analyze_run(run, AnalysisConfig(exact_svd=True, power_tol=1e-6), cache_dir=cache)
    assert fourth.cache_hits == 0
    assert len(list(cache.glob("step_*.json"))) == 3  # stale entries were replaced, not piled up
    assert CheckpointCache(None).load(0, "x") is None


def test_class_pair_for_user_classes_and_tables_without_classes(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, class_names=("cats", "dogs"), n_ckpt=1)
    res = analyze_run(run)
    tau = res.tables["tau"]
    # "dogs" has the higher final loss in make_run (second class, +0.5 nats), so it is class a
    assert set(tau["class_a"]) == {"dogs"} and set(tau["class_b"]) == {"cats"}
    assert any("highest and lowest final loss" in n for n in res.notes)
    assert res.tables["update_ratio"].empty  # a single checkpoint has no predecessor
    bare = Run(path=tmp_path, name="bare", source_format="synthetic", scalars=run.scalars)
    res2 = analyze_run(bare)
    assert "per-class" in res2.panels["class_losses"]
    assert "no checkpoints" in res2.panels["spectral"]
    assert res2.summary["tau"] is None and res2.summary["overfitting"]["verdict"] is None
    assert validate_summary(res2.summary) == []
    _columns_ok(res2.tables)


# --------------------------------------------------------------------------- the tiny demo run


@pytest.fixture(scope="module")
def demo_result(tiny_demo_run: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return analyze_run(tiny_demo_run, cache_dir=cache), cache


def _hooked_pass(run_dir: Path, step: int):
    """Plain-torch reference: rebuild MiniGPT, load the checkpoint, run the eval set in batches of 64
    and record block outputs, FFN activations and attention maps."""
    import json

    from analyze.demo.model import MiniGPT, MiniGPTConfig

    meta = json.loads((run_dir / "run.json").read_text())
    model = MiniGPT(MiniGPTConfig.from_dict(meta["model"]["config"])).eval()
    sd = load_file(str(run_dir / "checkpoints" / f"step_{step:08d}.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) <= {"head.weight"} and not unexpected  # tied head
    data = load_file(str(run_dir / "eval_set.safetensors"))
    rec: dict[str, list] = {}

    def keep(name):
        return lambda _m, _i, out: rec.setdefault(name, []).append(out.detach())

    hooks = [model.blocks[0].register_forward_hook(keep("blocks.0")),
             model.blocks[1].mlp.act.register_forward_hook(keep("act1")),
             model.blocks[0].attn.probs.register_forward_hook(keep("probs0"))]
    logits = []
    with torch.no_grad():
        for i in range(0, data["input_ids"].shape[0], 64):
            logits.append(model(data["input_ids"][i:i + 64]))
    for h in hooks:
        h.remove()
    return model, data, rec, torch.cat(logits)


def test_demo_run_end_to_end_and_panels_match_direct_computation(demo_result, tiny_demo_run: Path) -> None:
    res, _ = demo_result
    _columns_ok(res.tables)
    assert validate_summary(res.summary) == []
    assert all(v == "" for v in res.panels.values()), res.panels
    assert res.summary["run"]["checkpoints"] == [0, 20, 40]
    step = 40
    model, data, rec, logits = _hooked_pass(tiny_demo_run, step)
    real = data["attention_mask"]

    # §3 activation magnitude: mean over batches of per-batch mean |A| over real tokens, +-1 sample std
    per_batch = np.array([float((a.abs() * m[..., None]).sum() / (m.sum() * a.shape[-1]))
                          for a, m in zip(rec["blocks.0"], real.split(64))])
    act = res.tables["activations"]
    row = act[(act["step"] == step) & (act["layer"] == "blocks.0")].iloc[0]
    assert row["mean_abs"] == pytest.approx(per_batch.mean(), rel=1e-6)
    assert row["std"] == pytest.approx(per_batch.std(ddof=1), rel=1e-5)
    assert row["n_batches"] == len(per_batch)

    # §5 dead units: max |H| over real tokens < eps, counted by hand
    h = torch.cat(rec["act1"]).abs()  # (N, L, d_ff)
    h = torch.where(real[..., None], h, torch.zeros(()))
    dead = int((h.amax(dim=(0, 1)) < 1e-3).sum())
    dn = res.tables["dead_neurons"]
    drow = dn[(dn["step"] == step) & (dn["layer"] == "blocks.1.mlp.act")].iloc[0]
    assert (drow["dead_count"], drow["d_ff"], drow["n_tokens"]) == (dead, 256, int(real.sum()))
    # §5 f_j per unit: share of real tokens with |H| >= eps, by hand; its table agrees with the counts
    f_ref = ((h >= 1e-3) & real[..., None]).sum(dim=(0, 1)).double().numpy() / int(real.sum())
    af = res.tables["activation_frequency"]
    arows = af[(af["step"] == step) & (af["layer"] == "blocks.1.mlp.act")].sort_values("unit")
    assert list(arows["unit"]) == list(range(256))
    np.testing.assert_allclose(arows["f_j"].astype(float), f_ref, rtol=0, atol=1e-12)
    assert int((arows["f_j"] < 1e-3).sum()) == drow["near_dead_count"]
    assert 1.0 - arows["f_j"].mean() == pytest.approx(drow["activation_sparsity"], abs=1e-12)
    assert len(af) == len(dn) * 256  # every checkpoint x FFN layer x unit

    # §6 attention entropy of layer 0 head 0: mean over queries with >= 2 visible real keys
    alpha = torch.cat(rec["probs0"])[:, 0].double()  # (N, L, L)
    ent = -(alpha * torch.log(alpha.clamp_min(1e-300))).sum(-1)  # (N, L)
    n_keys = torch.cumsum(real.long(), dim=1)  # keys visible to query q: real tokens at <= q
    elig = real & (n_keys >= 2)
    at = res.tables["attention"]
    arow = at[(at["step"] == step) & (at["layer"] == 0) & (at["head"] == 0)].iloc[0]
    assert arow["mean_entropy"] == pytest.approx(float(ent[elig].mean()), rel=1e-6)
    norm = ent / torch.log(n_keys.clamp_min(2).double())
    assert arow["mean_norm_entropy"] == pytest.approx(float(norm[elig].mean()), rel=1e-6)

    # §7 token-weighted eval loss and §8 checkpoint tau with Welch SE, by plain cross-entropy
    tok = F.cross_entropy(logits.transpose(1, 2), data["targets"], reduction="none").double()
    mask = data["target_mask"]
    es = res.tables["eval_set"]
    assert es[es["step"] == step]["loss"].iloc[0] == pytest.approx(float(tok[mask].mean()), rel=1e-6)
    per_ex = ((tok * mask).sum(1) / mask.sum(1)).numpy()
    cls = data["class_ids"].numpy()
    irr, reg = per_ex[cls == 1], per_ex[cls == 0]
    tau = res.tables["tau"]
    trow = tau[(tau["source"] == "checkpoint") & (tau["step"] == step)].iloc[0]
    assert trow["tau"] == pytest.approx(irr.mean() - reg.mean(), rel=1e-6)
    assert trow["se"] == pytest.approx(math.sqrt(irr.var(ddof=1) / irr.size + reg.var(ddof=1) / reg.size), rel=1e-6)
    # the logged evaluation of the same weights on the same set agrees (source eval:val)
    lrow = tau[(tau["source"] == "eval:val") & (tau["step"] == step)].iloc[0]
    assert lrow["tau"] == pytest.approx(trow["tau"], rel=1e-5)

    # §11 rho: the demo logs per-tensor gradient norms at its checkpoint steps, so every row is from
    # training (checked against the logged norms and the weights in tests/test_analyze/test_gradients.py);
    # the last checkpoint (40) has no training step, so no rho there
    gr = res.tables["grad_ratio"]
    assert set(gr["source"]) == {"training"} and sorted(set(gr["step"])) == [0, 20]

    # §4 spectral norm against torch.linalg.matrix_norm(ord=2)
    sp = res.tables["spectral"]
    srow = sp[(sp["step"] == step) & (sp["tensor"] == "blocks.1.attn.qkv.weight")].iloc[0]
    exact = float(torch.linalg.matrix_norm(model.blocks[1].attn.qkv.weight.detach().double(), ord=2))
    assert srow["sigma_exact"] == pytest.approx(exact, rel=1e-9)
    assert abs(srow["sigma_est"] - exact) / exact <= 1e-3


def test_demo_rerun_is_served_from_cache(demo_result, tiny_demo_run: Path) -> None:
    res, cache = demo_result
    again = analyze_run(tiny_demo_run, cache_dir=cache)
    assert (again.cache_hits, again.cache_misses) == (3, 0)
    for name in TABLE_COLUMNS:
        pd.testing.assert_frame_equal(res.tables[name].reset_index(drop=True),
                                      again.tables[name].reset_index(drop=True), check_dtype=False, obj=name)
    assert [f.message for f in again.findings] == [f.message for f in res.findings]


def test_workers_give_the_same_tables(tiny_demo_run: Path, demo_result) -> None:
    res, _ = demo_result
    par = analyze_run(tiny_demo_run, AnalysisConfig(workers=2))
    for name in ("dead_neurons", "attention", "activations", "eval_set"):
        pd.testing.assert_frame_equal(res.tables[name].reset_index(drop=True),
                                      par.tables[name].reset_index(drop=True), check_dtype=False,
                                      rtol=1e-5, obj=name)


def test_summary_outputs_against_the_tables_and_the_config_reaches_the_report(tmp_path: Path) -> None:
    """spike_score, heights in both units, checkpoint_to_keep and finding counts recomputed from the
    result's own tables; a non-default config travels on the result into the report's text."""
    run, truth = make_run(tmp_path)
    cfg = AnalysisConfig(exact_svd=True, class_window=50, rho_low=2.5e-5, rho_high=0.25, spike_k=5.0)
    res = analyze_run(run, cfg)
    assert res.config is cfg
    assert validate_summary(res.summary) == []
    # §9 spike score: flagged logged points over all logged points, per series
    tr = res.tables["train"]
    for series in ("loss", "grad_norm"):
        flags = tr.loc[tr["series"] == series, "spike"].astype(bool)
        assert res.summary["spike_score"][series] == pytest.approx(flags.mean(), abs=0)
    assert res.summary["spike_score"]["loss"] > 0  # the planted spike
    sp = res.tables["spikes"]
    spikes = sp[sp["kind"] == "spike"]
    np.testing.assert_allclose(spikes["height_mad"].astype(float), 1.4826 * spikes["height_sigma"].astype(float),
                               rtol=1e-12)
    assert (spikes["height_sigma"].astype(float) > cfg.spike_k).all()
    # checkpoint_to_keep by hand: each checkpoint's validation loss is the evaluation at its step or the
    # latest before it; the last stable checkpoint precedes the first flagged event of either series
    ev_steps, val = truth["ev_steps"], truth["val"]
    ck = [r.step for r in truth["refs"]]
    ck_val = [val[np.flatnonzero(ev_steps <= s)[-1]] for s in ck]
    first_event = int(sp["first_step"].min())
    keep = res.summary["checkpoint_to_keep"]
    assert keep["best_val_step"] == ck[int(np.argmin(ck_val))]
    assert keep["last_stable_step"] == max(s for s in ck if s < first_event)
    assert res.headline["checkpoint_to_keep"] == keep
    # counts: a "N more" row counts N; stdout and summary.json print the same numbers
    by_sev = {s: sum(f.n for f in res.findings if f.severity == s) for s in ("error", "warning", "info")}
    assert res.counts == res.summary["finding_counts"] == by_sev
    assert res.headline["worst_finding"] is res.findings[0]
    # the config's rho band reaches the report's text (not the defaults)
    from reports.html import render_report
    from reports.page import fmt_sci

    html = render_report(res)
    assert f"between {fmt_sci(2.5e-5)} and {fmt_sci(0.25)}" in html
    assert f"between {fmt_sci(1e-4)} and {fmt_sci(0.1)}" not in html
