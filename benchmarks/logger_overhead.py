"""Logger overhead on the demo model (§13): median CPU step time with and
without RunLogger (without and with per-tensor gradient norms recorded every step), and with
TensorBoard's SummaryWriter.add_scalar logging the same values every step, measured side by
side in one process in interleaved blocks.

    python benchmarks/logger_overhead.py [--steps-per-mode 400] [--block 20]

Each "step" is a full training step (forward, backward, AdamW) of MiniGPT on a batch of 32
verb-corpus sentences. The logged variant calls log_step (global grad norm from the model's
grads) and log_class_losses every step, log_eval never (it is rare) and flushes every 50
steps with fsync, as in the demo. "trainaudit+norms" is the same with
RunLogger(grad_norms_every=1): the per-tensor norms of the global norm's reduction (§11) are
kept and written every step, the most a user can ask for (the default keeps them at checkpoint
steps only).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from analyze.demo import corpus
from analyze.demo.model import MiniGPT, MiniGPTConfig
from analyze.demo.train import masked_losses
from loaders.logger import RunLogger


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-mode", type=int, default=400)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=30)
    args = ap.parse_args()

    torch.manual_seed(0)
    vocab = corpus.vocabulary()
    data = corpus.encode(corpus.build_examples("train"), vocab)
    model = MiniGPT(MiniGPTConfig(vocab_size=len(vocab), context=corpus.CONTEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = corpus.batches(data, 32, 0)
    tmp = Path(tempfile.mkdtemp(prefix="trainaudit-bench-"))
    log = RunLogger(tmp / "run", class_names=corpus.CLASS_NAMES, flush_every=50)
    log_norms = RunLogger(tmp / "run_norms", class_names=corpus.CLASS_NAMES, flush_every=50, grad_norms_every=1)
    loggers = {"trainaudit": log, "trainaudit+norms": log_norms}
    try:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(tmp / "tb"))
    except ImportError:
        tb = None
    modes = ["none", "trainaudit", "trainaudit+norms"] + (["tensorboard"] if tb is not None else [])
    times: dict[str, list[float]] = {m: [] for m in modes}
    step = 0

    def one_step(mode: str) -> float:
        nonlocal step
        idx, targets, mask, cls = next(batches)
        t0 = time.perf_counter()
        loss, per_example = masked_losses(model(idx), targets, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode in loggers:
            loggers[mode].log_step(step, loss=loss, model=model, lr=1e-3)
            loggers[mode].log_class_losses(step, per_example, cls)
        elif mode == "tensorboard":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            gn = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            tb.add_scalar("train/loss", loss, step)
            tb.add_scalar("train/grad_norm", gn, step)
            tb.add_scalar("train/lr", 1e-3, step)
            for c, name in enumerate(corpus.CLASS_NAMES):
                sel = cls == c
                if bool(sel.any()):
                    tb.add_scalar(f"train/loss_{name}", per_example[sel].mean(), step)
        opt.step()
        step += 1
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for m in modes:
            one_step(m)
    blocks = args.steps_per_mode // args.block
    for b in range(blocks):
        order = modes if b % 2 == 0 else modes[::-1]
        for m in order:
            times[m].extend(one_step(m) for _ in range(args.block))
    log.close()
    log_norms.close()
    if tb is not None:
        tb.close()

    base = statistics.median(times["none"])
    print(f"MiniGPT {model.num_parameters():,} params, batch 32, {torch.get_num_threads()} threads, "
          f"{blocks} interleaved blocks of {args.block} steps per mode")
    print(f"{'mode':<12} {'steps':>6} {'median ms':>10} {'mean ms':>9} {'overhead':>9}")
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<12} {len(times[m]):>6} {med * 1e3:>10.3f} {statistics.fmean(times[m]) * 1e3:>9.3f} "
              f"{(med - base) / base * 100:>8.2f}%")
    # The logger's own cost, timed alone (no training noise): per-step calls plus amortised flush.
    reps = 2000
    loss, per_example = torch.tensor(1.0), torch.rand(32)
    cls = torch.randint(0, 2, (32,))
    n_tensors = sum(1 for p in model.parameters() if p.grad is not None)
    for what, every in (("without per-tensor grad norms", None),
                        (f"with per-tensor grad norms every step ({n_tensors} tensors)", 1)):
        g = RunLogger(tmp / f"alone{every}", class_names=corpus.CLASS_NAMES, flush_every=50, grad_norms_every=every)
        t0 = time.perf_counter()
        for s in range(reps):
            g.log_step(s, loss=loss, model=model, lr=1e-3)
            g.log_class_losses(s, per_example, cls)
        g.close()
        per_call = (time.perf_counter() - t0) / reps
        print(f"logger calls alone, {what}: {per_call * 1e6:.1f} us per step (incl. amortised flush+fsync) "
              f"= {per_call / base * 100:.2f}% of the median step")


if __name__ == "__main__":
    main()
