"""The logger's per-step calls never move a value to the host (no host-device sync).

On the CPU a sync cannot be observed directly, so every way a tensor value reaches Python
(`item`, `tolist`, `cpu`, `numpy`, `__float__`, `__bool__`, `__int__`, `__index__`) is made to
raise while log_step / log_class_losses run between flushes. On a CUDA machine the second
test uses torch's own sync detector.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loaders import RunLogger

HOST_TRANSFERS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__")


def test_per_step_calls_never_read_a_tensor_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model(torch.randn(4, 8)).sum().backward()
    log = RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=1000)
    calls: list[str] = []

    def forbid(name: str):
        def raiser(self: torch.Tensor, *a: object, **k: object) -> object:
            calls.append(name)
            raise AssertionError(f"Tensor.{name} called during a logged step")
        return raiser

    with monkeypatch.context() as m:
        for name in HOST_TRANSFERS:
            m.setattr(torch.Tensor, name, forbid(name))
        for step in range(20):
            loss = torch.rand(())
            log.log_step(step, loss=loss, model=model, lr=1e-3)
            log.log_class_losses(step, torch.rand(4), torch.tensor([0, 1, 1, 0]))
    assert calls == []
    log.close()  # the flush does read values, once for the whole window
    assert (tmp_path / "r" / "train.csv").read_text().count("\n") == 21


def test_per_tensor_grad_norm_steps_never_read_a_tensor_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor norms on every step (grad_norms_every=1), both ways: from the global norm's own
    reduction, and measured when the loop passes clip_grad_norm_'s result."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model(torch.randn(4, 8)).sum().backward()
    log = RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=1000, grad_norms_every=1)
    calls: list[str] = []

    def forbid(name: str):
        def raiser(self: torch.Tensor, *a: object, **k: object) -> object:
            calls.append(name)
            raise AssertionError(f"Tensor.{name} called during a logged step")
        return raiser

    with monkeypatch.context() as m:
        for name in HOST_TRANSFERS:
            m.setattr(torch.Tensor, name, forbid(name))
        for step in range(20):
            if step % 2:
                log.log_step(step, loss=torch.rand(()), model=model, lr=1e-3)
            else:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
                log.log_step(step, loss=torch.rand(()), model=model, grad_norm=gn)
    assert calls == []
    log.close()
    assert (tmp_path / "r" / "grad_norms.csv").read_text().count("\n") == 1 + 20 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_no_host_device_sync_per_step_on_cuda(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)).cuda()
    log = RunLogger(tmp_path / "r", class_names=["a", "b"], flush_every=1000, grad_norms_every=5)
    x = torch.randn(32, 64, device="cuda")
    ids = torch.randint(0, 2, (32,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(50):
            out = model(x)
            per_example = out.pow(2).mean(1)
            loss = per_example.mean()
            model.zero_grad(set_to_none=True)
            loss.backward()
            if step % 2:
                log.log_step(step, loss=loss, model=model, lr=1e-3)
            else:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # the clipping loop
                log.log_step(step, loss=loss, model=model, lr=1e-3, grad_norm=gn)
            log.log_class_losses(step, per_example, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log.close()
    assert (tmp_path / "r" / "train.csv").read_text().count("\n") == 51
    assert (tmp_path / "r" / "grad_norms.csv").read_text().count("\n") == 1 + 10 * 4
