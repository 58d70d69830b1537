"""RunLogger's per-tensor gradient norms (grad_norms.csv, §11): which steps, which values.

References are plain `torch.linalg.vector_norm` of each parameter's `.grad`, taken by the test
at the moment the loop calls the logger (before any clip for the clipping loop).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from loaders import RunLogger, load_run


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


def _rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """grad_norms.csv read with the csv module: step -> tensor -> norm."""
    out: dict[int, dict[str, float]] = {}
    with open(run_dir / "grad_norms.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["step", "tensor", "grad_norm"]
        for step, tensor, value in reader:
            out.setdefault(int(step), {})[tensor] = float(value)
    return out


def _backward(model: torch.nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(step)
    (model(torch.randn(16, 6, generator=g)) * (1 + step)).pow(2).mean().backward()


def _grad_norms(model: torch.nn.Module) -> dict[str, float]:
    return {n: float(torch.linalg.vector_norm(p.grad.double())) for n, p in model.named_parameters()}


def test_norms_at_schedule_and_checkpoint_steps_equal_each_grads_norm(tmp_path: Path) -> None:
    model = _model()
    expected: dict[int, dict[str, float]] = {}
    with RunLogger(tmp_path / "r", flush_every=4, grad_norms_every=5) as log:
        for step in range(23):
            if step == 7:                          # checkpoint saved before the step's log_step
                log.save_checkpoint(step, model)
            _backward(model, step)
            expected[step] = _grad_norms(model)
            log.log_step(step, loss=1.0, model=model)
            if step == 13:                         # checkpoint saved after the step's log_step
                log.save_checkpoint(step, model)
    got = _rows(tmp_path / "r")
    assert sorted(got) == [0, 5, 7, 10, 13, 15, 20]
    for step, norms in got.items():
        assert norms.keys() == expected[step].keys()
        for name, value in norms.items():
            assert value == pytest.approx(expected[step][name], rel=1e-6), (step, name)
    # the per-tensor norms make up the logged global norm (§2)
    run = load_run(tmp_path / "r")
    gn = run.series("grad_norm").set_index("step")["value"]
    for step, norms in got.items():
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(gn[step], rel=1e-6)
    table = run.grad_norms
    assert list(table.columns) == ["step", "tensor", "grad_norm"] and len(table) == 7 * 4
    assert str(table["step"].dtype) == "int64"


def test_clipping_loop_logs_the_pre_clip_norms(tmp_path: Path) -> None:
    """log_step(step, loss=..., grad_norm=clip_grad_norm_(...)) without `model`: per-tensor norms at
    the checkpoint steps from the module save_checkpoint got, rescaled to undo the clip."""
    model = _model(1)
    expected: dict[int, dict[str, float]] = {}
    clipped: dict[int, dict[str, float]] = {}
    with RunLogger(tmp_path / "r", flush_every=3) as log:
        for step in range(12):
            if step % 4 == 0:
                log.save_checkpoint(step, model)
            _backward(model, step)
            expected[step] = _grad_norms(model)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            clipped[step] = _grad_norms(model)
            log.log_step(step, loss=1.0, grad_norm=total)
    got = _rows(tmp_path / "r")
    assert sorted(got) == [0, 4, 8]
    for step, norms in got.items():
        assert sum(clipped[step].values()) < 0.5 * sum(expected[step].values())  # the clip did act
        for name, value in norms.items():
            assert value == pytest.approx(expected[step][name], rel=1e-5), (step, name)


def test_model_and_grad_norm_given_measures_only_at_scheduled_steps(tmp_path: Path) -> None:
    model = _model(2)
    expected = {}
    with RunLogger(tmp_path / "r", flush_every=50, grad_norms_every=4) as log:
        for step in range(10):
            _backward(model, step)
            expected[step] = _grad_norms(model)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)  # no clip
            log.log_step(step, loss=1.0, model=model, grad_norm=total)
    got = _rows(tmp_path / "r")
    assert sorted(got) == [0, 4, 8]
    for step, norms in got.items():
        assert norms == pytest.approx(expected[step], rel=1e-6)


def test_no_schedule_and_no_checkpoint_writes_no_file(tmp_path: Path) -> None:
    model = _model()
    with RunLogger(tmp_path / "r", flush_every=2) as log:
        for step in range(5):
            _backward(model, step)
            log.log_step(step, loss=1.0, model=model)
    assert not (tmp_path / "r" / "grad_norms.csv").exists()
    assert load_run(tmp_path / "r").grad_norms.empty
    with pytest.raises(ValueError, match="grad_norms_every"):
        RunLogger(tmp_path / "bad", grad_norms_every=0)


def test_resumed_run_keeps_the_latest_timeline_per_tensor(tmp_path: Path) -> None:
    model = _model()
    with RunLogger(tmp_path / "r", flush_every=2, grad_norms_every=2) as log:
        for step in range(7):
            _backward(model, step)
            log.log_step(step, loss=1.0, model=model)
    with RunLogger(tmp_path / "r", flush_every=2, grad_norms_every=2) as log:  # resumed from step 4
        for step in range(4, 7):
            _backward(model, 100 + step)
            last = _grad_norms(model)
            log.log_step(step, loss=1.0, model=model)
    t = load_run(tmp_path / "r").grad_norms
    assert sorted(set(t["step"])) == [0, 2, 4, 6]
    assert len(t) == 4 * 4  # one row per (step, tensor): the overlap 4..6 is replaced
    six = t[t["step"] == 6].set_index("tensor")["grad_norm"].to_dict()
    assert six == pytest.approx(last, rel=1e-6)
