"""RunLogger under torch.distributed (gloo, 2 processes): per-class sums, counts and M2 are
reduced over ranks and equal a single-process run on the same data; only rank 0 writes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders import RunLogger, load_run

SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from loaders import RunLogger
    rank, world, port, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, generator=g, dtype=torch.float64) * 4, torch.randint(0, 3, (16,), generator=g))
            for _ in range(6)]
    with RunLogger(out, class_names=["x", "y", "z"], flush_every=4) as log:
        for step, (loss, ids) in enumerate(data):
            shard = slice(rank * 8, rank * 8 + 8)          # each rank sees half the batch
            log.log_step(step, loss=loss[shard].mean())
            log.log_class_losses(step, loss[shard], ids[shard])
        log.log_eval(6, split="val", loss=1.0, per_example_loss=data[0][0][shard], class_ids=data[0][1][shard])
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_match_a_single_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "ddp"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), port, str(out)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(16, generator=g, dtype=torch.float64) * 4, torch.randint(0, 3, (16,), generator=g))
            for _ in range(6)]
    with RunLogger(tmp_path / "single", class_names=["x", "y", "z"]) as log:
        for step, (loss, ids) in enumerate(data):
            log.log_class_losses(step, loss, ids)
    ddp, single = load_run(out), load_run(tmp_path / "single")
    cols = ["step", "cls", "count", "loss_sum", "loss_m2"]
    a = ddp.class_losses[cols].sort_values(["step", "cls"]).reset_index(drop=True)
    b = single.class_losses[cols].sort_values(["step", "cls"]).reset_index(drop=True)
    assert a[["step", "cls", "count"]].equals(b[["step", "cls", "count"]])
    np.testing.assert_allclose(a[["loss_sum", "loss_m2"]], b[["loss_sum", "loss_m2"]], rtol=1e-12, atol=1e-12)
    # reference by numpy: class y at step 2 over the whole batch
    loss, ids = data[2][0].numpy(), data[2][1].numpy()
    vals = loss[ids == 1]
    row = a[(a["step"] == 2) & (a["cls"] == "y")].iloc[0]
    assert row["count"] == len(vals) and row["loss_m2"] == pytest.approx(((vals - vals.mean()) ** 2).sum())
    assert ddp.meta["world_size"] == 2
    assert ddp.eval_class_losses["count"].sum() == 16        # eval counts every rank's examples
    assert len(ddp.series("loss")) == 6                       # rank 0 wrote once per step
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
