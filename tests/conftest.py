"""Shared fixtures: a tiny demo run trained once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step demo run: eval every 10 steps, checkpoints at 0, 20, 40."""
    from analyze.demo.train import DemoSettings, train_demo

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train_demo(out, DemoSettings(steps=40, eval_every=10, checkpoint_every=20, flush_every=7))
