"""SIGKILL the logging process at random moments, many times (bad-inputs.md G1, G2).

A server process imports torch once and forks one child per trial (fork is ~ms, a fresh
interpreter with torch ~1 s). The child logs steps and saves a checkpoint every 10 steps,
acknowledging each flush over a pipe only after it returned (fsync done); the server kills it
with SIGKILL after a random delay and checks the run: every acknowledged step is read back,
at most the final record is torn, and the last completed checkpoint loads.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from sigkill_harness import run_server

SERVER = textwrap.dedent(r"""
    import json, os, random, sys
    import torch
    torch.set_num_threads(1)            # no OpenMP pool before fork
    from safetensors.torch import load_file
    from loaders import RunLogger, load_run
    from sigkill_harness import fork_log_and_kill

    root, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    weights = {"w": torch.zeros(256, 256), "b": torch.zeros(256)}   # 256 KiB checkpoints
    results = {"trials": 0, "acked_steps": 0, "torn_tails": 0, "killed_in_save": 0, "failures": []}
    for trial in range(trials):
        run_dir = os.path.join(root, f"r{trial}")
        def child(ack):
            with RunLogger(run_dir, class_names=["a", "b"], flush_every=3) as log:
                step = 0
                while True:
                    log.log_step(step, loss=float(step), grad_norm=1.0)
                    log.log_class_losses(step, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
                    if step % 10 == 0:
                        weights["w"].fill_(float(step))
                        log.save_checkpoint(step, weights)
                    if (step + 1) % 3 == 0:             # flush (with fsync) just returned
                        ack(step)
                    step += 1
        last_ack = fork_log_and_kill(child, 0.08, rng, min_delay=0.0)
        results["trials"] += 1
        results["acked_steps"] += last_ack + 1
        if not os.path.exists(os.path.join(run_dir, "run.json")):
            if last_ack >= 0:
                results["failures"].append(f"{trial}: acked {last_ack} but no run.json")
            continue
        try:
            run = load_run(run_dir)
        except Exception as exc:
            results["failures"].append(f"{trial}: load failed: {exc}")
            continue
        steps = run.series("loss")["step"].tolist()
        if steps[: last_ack + 1] != list(range(last_ack + 1)):
            results["failures"].append(f"{trial}: acked up to {last_ack}, read {steps[-3:]}")
        if steps != list(range(len(steps))):
            results["failures"].append(f"{trial}: steps not a prefix")
        torn = [x for x in run.warnings if "incomplete final line" in x]
        other = [x for x in run.warnings if "incomplete final line" not in x and "temp file" not in x]
        results["torn_tails"] += len(torn)
        results["killed_in_save"] += any("temp file" in x for x in run.warnings)
        if other or any(x.count("incomplete") > 1 for x in torn):
            results["failures"].append(f"{trial}: unexpected warnings {other}")
        if run.checkpoints:
            last = run.checkpoints[-1]
            try:
                t = load_file(last.path)
                if float(t["w"][0, 0]) != last.step:
                    results["failures"].append(f"{trial}: checkpoint {last.step} holds {float(t['w'][0, 0])}")
            except Exception as exc:
                results["failures"].append(f"{trial}: checkpoint {last.path} does not load: {exc}")
    print(json.dumps(results))
""")


def test_logger_survives_200_random_sigkills(tmp_path: Path) -> None:
    results = run_server(SERVER, tmp_path, 200, 12345)
    print(results)
    assert results["trials"] == 200
    assert results["failures"] == []
    assert results["acked_steps"] > 200  # the kills did land after real work
