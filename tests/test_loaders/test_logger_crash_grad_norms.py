"""SIGKILL a process that logs per-tensor gradient norms every step (grad_norms.csv, §11).

The SIGKILL harness of tests/sigkill_harness.py (one torch import, a fork per trial, flushes acknowledged
over a pipe after they returned): after the kill, every acknowledged step has one complete row
per tensor with the value the child computed, and nothing but a torn final line is lost.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from sigkill_harness import run_server

SERVER = textwrap.dedent(r"""
    import json, os, random, sys
    import torch
    torch.set_num_threads(1)
    from loaders import RunLogger, load_run
    from sigkill_harness import fork_log_and_kill

    root, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    names = [n for n, _ in model.named_parameters()]
    def set_grads(step):                 # grads whose norms are known: ||G_p|| = (step + 1) * (p + 1)
        for p_i, p in enumerate(model.parameters()):
            g = torch.zeros_like(p).reshape(-1)
            g[0] = float((step + 1) * (p_i + 1))
            p.grad = g.reshape(p.shape)
    results = {"trials": 0, "acked_steps": 0, "failures": []}
    for trial in range(trials):
        run_dir = os.path.join(root, f"r{trial}")
        def child(ack):
            with RunLogger(run_dir, flush_every=2, grad_norms_every=1) as log:
                step = 0
                while True:
                    set_grads(step)
                    log.log_step(step, loss=float(step), model=model)
                    if (step + 1) % 2 == 0:
                        ack(step)
                    step += 1
        last_ack = fork_log_and_kill(child, 0.15, rng, min_delay=0.01)
        results["trials"] += 1
        results["acked_steps"] += last_ack + 1
        if not os.path.exists(os.path.join(run_dir, "run.json")):
            continue
        try:
            run = load_run(run_dir)
        except Exception as exc:
            results["failures"].append(f"{trial}: load failed: {exc}")
            continue
        t = run.grad_norms
        for step, g in t.groupby("step"):
            want = {n: float((step + 1) * (i + 1)) for i, n in enumerate(names)}
            got = dict(zip(g["tensor"], g["grad_norm"]))
            if step <= last_ack and got != want:
                results["failures"].append(f"{trial}: step {step}: {got} != {want}")
            elif any(want[n] != v for n, v in got.items() if n in want) or not set(got) <= set(want):
                results["failures"].append(f"{trial}: step {step} holds a wrong row {got}")
        steps = sorted(set(t["step"]))
        if steps[: last_ack + 1] != list(range(last_ack + 1)):
            results["failures"].append(f"{trial}: acked {last_ack}, grad norm steps {steps[-3:]}")
        other = [x for x in run.warnings if "incomplete final line" not in x]
        if other:
            results["failures"].append(f"{trial}: unexpected warnings {other}")
    print(json.dumps(results))
""")


def test_grad_norm_rows_survive_random_sigkills(tmp_path: Path) -> None:
    results = run_server(SERVER, tmp_path, 30, 2024)
    print(results)
    assert results["trials"] == 30
    assert results["failures"] == []
    assert results["acked_steps"] > 30  # the kills did land after real work
