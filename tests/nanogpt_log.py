"""nanoGPT's training stdout, printed with the exact f-strings of its train.py (shared by the
nanoGPT loader tests and the real-writer tests; pythonpath = tests)."""
from __future__ import annotations


def nanogpt_stdout(iters: dict[int, tuple[float, float, float]], evals: dict[int, tuple[float, float]],
                   saves: tuple[int, ...] = ()) -> str:
    """A training stdout as nanoGPT's train.py prints it: its preamble, config echo, and the exact
    f-strings of its eval and iteration lines (``losses``, ``lossf``, ``dt``, ``running_mfu``).
    ``iters``: iter -> (lossf, dt seconds, running_mfu); ``evals``: iter -> (train, val)."""
    out = ["Overriding config with config/train_shakespeare_char.py:",
           "# train a miniature character-level shakespeare model",
           "eval_interval = 250 # keep frequent because we'll overfit", "max_iters = 5000",
           "tokens per iteration will be: 16,384",
           "found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)",
           "Initializing a new model from scratch", "number of parameters: 10.65M",
           "num decayed parameter tensors: 26, with 10,740,096 parameters",
           "using fused AdamW: False"]
    for it in sorted(set(iters) | set(evals)):
        if it in evals:
            losses = {"train": evals[it][0], "val": evals[it][1]}
            out.append(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if it in saves:
                out.append("saving checkpoint to out")
        if it in iters:
            lossf, dt, running_mfu = iters[it]
            out.append(f"iter {it}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
    return "\n".join(out) + "\n"
