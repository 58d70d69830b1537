"""RunLogger: round trip, grad norm against a plain reference, crash and resume behaviour."""
from __future__ import annotations

import math

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loaders import RunLogger, load_run
from loaders.logger import class_welford_state, global_grad_norm


def _toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def test_round_trip_values_written_equal_values_read(tmp_path: Path) -> None:
    model = _toy_model()
    rng = np.random.default_rng(0)
    losses = rng.normal(2.0, 0.5, size=23)
    losses[5] = np.nan  # non-finite values are stored as such, never dropped (§2)
    expected_gn, expected_class = [], []
    with RunLogger(tmp_path / "r", config={"lr": 0.1}, class_names=["a", "b", "c"], flush_every=4) as log:
        for step, loss in enumerate(losses):
            x = torch.randn(8, 5)
            model.zero_grad()
            model(x).pow(2).mean().backward()
            expected_gn.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
            log.log_step(step, loss=torch.tensor(loss), model=model, lr=0.1 * (step + 1))
            per_example = torch.rand(8, dtype=torch.float64) * 3
            ids = torch.tensor([0, 0, 2, 2, 2, 0, 2, 0])  # class "b" absent: skipped (§8)
            expected_class.append((step, per_example, ids))
            log.log_class_losses(step, per_example, ids)
        log.log_eval(10, split="val", loss=1.5, class_losses={"a": (1.25, 40), "b": 2.0})
        log.save_checkpoint(20, model)
    run = load_run(tmp_path / "r")
    got = run.series("loss")
    assert got["step"].tolist() == list(range(23))
    np.testing.assert_array_equal(got["value"].to_numpy(), losses)  # exact: repr round-trips float64
    np.testing.assert_allclose(run.series("grad_norm")["value"], expected_gn, rtol=1e-6)
    np.testing.assert_allclose(run.series("lr")["value"], 0.1 * (np.arange(23) + 1), rtol=1e-15)
    cl = run.class_losses
    assert set(cl["cls"]) == {"a", "c"}
    for step, per_example, ids in expected_class:
        for cid, name in ((0, "a"), (2, "c")):
            vals = per_example[ids == cid].numpy()
            row = cl[(cl["step"] == step) & (cl["cls"] == name)].iloc[0]
            assert row["count"] == len(vals)
            assert row["loss_sum"] == pytest.approx(vals.sum(), rel=1e-12)
            assert row["loss_m2"] == pytest.approx(((vals - vals.mean()) ** 2).sum(), rel=1e-9, abs=1e-12)
    assert run.evals.to_dict("records") == [{"step": 10, "series": "val", "loss": 1.5}]
    ec = run.eval_class_losses.set_index("cls")
    assert ec.loc["a", "count"] == 40 and ec.loc["a", "loss_sum"] == pytest.approx(50.0)
    assert [c.step for c in run.checkpoints] == [20]
    tensors = load_file(run.checkpoints[0].path)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=0)
    assert run.meta["config"] == {"lr": 0.1} and run.class_names == ["a", "b", "c"]
    assert not run.warnings


def test_grad_norm_equals_plain_vector_norm() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(3, 4), torch.randn(17), torch.randn(2, 2, 2)]
    reference = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert float(global_grad_norm(grads)) == pytest.approx(float(reference), rel=1e-6)


def test_logged_grad_norm_of_half_precision_model_is_float32_accurate(tmp_path: Path) -> None:
    # bf16 grads: the norm accumulates in float32 (a bf16 result has 3 significant digits), and a
    # step whose model has no gradients logs NaN ("nothing measured"), not 0.
    model = torch.nn.Linear(64, 32).to(torch.bfloat16)
    model(torch.randn(16, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    ref = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    with RunLogger(tmp_path / "r", flush_every=1) as log:
        log.log_step(1, loss=1.0, model=model)
        model.zero_grad(set_to_none=True)
        log.log_step(2, loss=1.0, model=model)
    gn = load_run(tmp_path / "r").train.set_index("step")["grad_norm"]
    assert gn[1] == pytest.approx(ref, rel=1e-6)
    assert math.isnan(gn[2])


def test_class_state_matches_numpy_per_class() -> None:
    rng = np.random.default_rng(3)
    loss = rng.gamma(2.0, 1.0, size=64)
    ids = rng.integers(0, 4, size=64)
    state = class_welford_state(torch.from_numpy(loss), torch.from_numpy(ids), 5).numpy()
    for c in range(5):
        vals = loss[ids == c]
        assert state[0, c] == len(vals)
        assert state[1, c] == pytest.approx(vals.sum(), rel=1e-12)
        expected_m2 = ((vals - vals.mean()) ** 2).sum() if len(vals) else 0.0
        assert state[2, c] == pytest.approx(expected_m2, rel=1e-10, abs=1e-12)


def test_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "r", flush_every=1) as log:
        for s in range(5):
            log.log_step(s, loss=float(s))
    with open(tmp_path / "r" / "train.csv", "ab") as f:
        f.write(b"5,0.12")  # a write cut by a kill
    run = load_run(tmp_path / "r")
    assert run.series("loss")["step"].tolist() == [0, 1, 2, 3, 4]
    assert any("train.csv:7: incomplete final line ignored" in w for w in run.warnings)


def test_resumed_run_keeps_the_latest_timeline(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "r", flush_every=3) as log:
        for s in range(10):
            log.log_step(s, loss=1.0)
    with RunLogger(tmp_path / "r", flush_every=3) as log:  # restart from checkpoint 5
        log.mark_resume(5)
        for s in range(5, 13):
            log.log_step(s, loss=2.0)
    run = load_run(tmp_path / "r")
    loss = run.series("loss")
    assert loss["step"].tolist() == list(range(13))
    assert loss["value"].tolist() == [1.0] * 5 + [2.0] * 8
    assert any("resume at step 5 (overlap 5-9)" in w for w in run.warnings)
    assert any("resumed at step 5" in n for n in run.notes)


def test_logger_module_imports_no_pandas() -> None:
    code = "import sys, loaders.logger; bad = [m for m in ('pandas', 'scipy', 'seaborn') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


CHILD = textwrap.dedent("""
    import sys, torch
    from loaders import RunLogger
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    with RunLogger(sys.argv[1], class_names=["a", "b"], flush_every=5) as log:
        for step in range(100000):
            log.log_step(step, loss=float(step), model=model)
            log.log_class_losses(step, torch.rand(4), torch.tensor([0, 1, 0, 1]))
            if (step + 1) % 5 == 0:            # just flushed: acknowledge
                print(step, flush=True)
            if step % 20 == 0:
                with torch.no_grad():
                    model.weight.fill_(float(step))
                log.save_checkpoint(step, model)
""")


@pytest.mark.parametrize("delay", [0.3, 0.55, 0.8])
def test_sigkill_mid_run_leaves_a_loadable_run(tmp_path: Path, delay: float) -> None:
    run_dir = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    acked = -1
    deadline = time.monotonic() + 60
    start = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
        start = start or time.monotonic()
        if time.monotonic() - start > delay:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert acked >= 4, "child never acknowledged a flush"
    run = load_run(run_dir)
    steps = run.series("loss")["step"].to_numpy()
    assert steps[: acked + 1].tolist() == list(range(acked + 1))  # every acknowledged step is there
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    finals = [f for f in files if not f.startswith(".")]
    assert finals and all(f.endswith(".safetensors") for f in finals)
    last = run.checkpoints[-1]
    tensors = load_file(last.path)  # the last complete checkpoint always loads
    assert float(tensors["weight"][0, 0]) == float(last.step)
    # a restart cleans temp files left by the kill
    RunLogger(run_dir).close()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nonfinite_example_losses_surface_as_data_warnings(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=2) as log:
        for s in range(4):
            log.log_step(s, loss=1.0, grad_norm=1.0)
            log.log_class_losses(s, torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([0, 1, 1]))
        log.log_eval(4, loss=1.0, per_example_loss=torch.tensor([float("inf"), 1.0, 3.0]),
                     class_ids=torch.tensor([0, 1, 0]))
    w = load_run(tmp_path / "r").warnings
    assert any("events.jsonl" in x and "4 training example loss(es)" in x for x in w), w
    assert any("eval.jsonl:1" in x and "1 example loss(es)" in x and "step 4" in x for x in w), w
