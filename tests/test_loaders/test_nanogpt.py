"""nanoGPT ckpt.pt dictionaries written with torch.save, as nanoGPT's train.py writes them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loaders.checkpoints import checkpoint_info, iter_tensors
from loaders.errors import TrainauditError
from loaders.formats.nanogpt import read_nanogpt
from nanogpt_log import nanogpt_stdout  # tests/nanogpt_log.py (pythonpath = tests)


def nanogpt_state(n_layer: int = 2, n_embd: int = 8, vocab: int = 11, block: int = 6) -> dict[str, torch.Tensor]:
    """The state-dict layout of nanoGPT's GPT (model.py), with lm_head tied to wte."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"transformer.wte.weight": r(vocab, n_embd), "transformer.wpe.weight": r(block, n_embd)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd |= {h + "ln_1.weight": torch.ones(n_embd), h + "attn.c_attn.weight": r(3 * n_embd, n_embd),
               h + "attn.c_proj.weight": r(n_embd, n_embd), h + "ln_2.weight": torch.ones(n_embd),
               h + "mlp.c_fc.weight": r(4 * n_embd, n_embd), h + "mlp.c_proj.weight": r(n_embd, 4 * n_embd)}
    sd["transformer.ln_f.weight"] = torch.ones(n_embd)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying, as in GPT.__init__
    return sd


MODEL_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 6, "bias": False, "vocab_size": 11,
              "dropout": 0.0}


def save_ckpt(p: Path, sd: dict[str, torch.Tensor], model_args: dict | None = None,  # type: ignore[type-arg]
              **extra) -> Path:  # type: ignore[no-untyped-def]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "model_args": model_args or MODEL_ARGS,
            "iter_num": 2000, "best_val_loss": torch.tensor(1.5052),
            "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare_char"}} | extra
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, p)
    return p


def test_nanogpt_checkpoint_round_trip(tmp_path: Path) -> None:
    sd = nanogpt_state()
    p = save_ckpt(tmp_path / "out" / "ckpt.pt", sd)
    run = read_nanogpt(tmp_path / "out")
    assert run.source_format == "nanogpt" and run.name == "out"
    assert [(c.step, c.kind, c.path) for c in run.checkpoints] == [(2000, "torch", p)]
    assert run.model is not None and run.model.name == "nanogpt" and run.model.config == MODEL_ARGS
    assert run.meta["best_val_loss"] == pytest.approx(1.5052, rel=1e-6)
    assert run.meta["config"]["dataset"] == "shakespeare_char"
    got = dict(iter_tensors(p))
    assert "lm_head.weight" not in got  # tied: yielded once, under the first name
    assert set(got) == set(sd) - {"lm_head.weight"} and all(torch.equal(got[k], sd[k]) for k in got)
    info = checkpoint_info(p)
    assert info.container_key == "model" and info.tied == (("transformer.wte.weight", "lm_head.weight"),)
    assert info.n_params == sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")


def test_compiled_model_prefix(tmp_path: Path) -> None:
    sd = {f"_orig_mod.{k}": v for k, v in nanogpt_state().items()}
    p = save_ckpt(tmp_path / "ckpt.pt", sd)
    run = read_nanogpt(p)
    assert run.model is not None
    assert {n for n, _ in iter_tensors(p)} == set(nanogpt_state()) - {"lm_head.weight"}


def test_nonstandard_model_args_give_no_model(tmp_path: Path) -> None:
    args = {"vocab_size": 32, "seq_length": 8, "num_layers": 2, "num_heads": 2, "dim_embedding": 16}
    p = save_ckpt(tmp_path / "ckpt.pt", nanogpt_state(), model_args=args)
    run = read_nanogpt(p)
    assert run.model is None and run.meta["model_args"] == args
    assert any("not nanoGPT's GPTConfig" in n for n in run.notes)
    assert [c.step for c in run.checkpoints] == [2000]


def test_not_a_nanogpt_dict(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, p)
    with pytest.raises(TrainauditError, match="not a nanoGPT checkpoint"):
        read_nanogpt(p)


# --------------------------------------------------------------------------- stdout logs

def _points(n: int = 30, eval_every: int = 10, seed: int = 3):  # type: ignore[no-untyped-def]
    import random
    rnd = random.Random(seed)
    iters = {i: (4.2 - 0.05 * i + rnd.random() * 0.1, 0.02 + rnd.random() / 100,
                 -1.0 if i < 5 else rnd.random() / 10) for i in range(n)}
    evals = {i: (4.3 - 0.05 * i, 4.35 - 0.04 * i) for i in range(0, n, eval_every)}
    return iters, evals


def test_stdout_log_every_point(tmp_path: Path) -> None:
    from loaders.detect import detect_format, open_run
    iters, evals = _points()
    log = tmp_path / "train.log"
    log.write_text(nanogpt_stdout(iters, evals))
    assert detect_format(log) == "nanogpt"
    for run in (open_run(log), open_run(log, format="nanogpt")):
        assert run.source_format == "nanogpt" and run.checkpoints == []
        loss = run.series("loss")
        assert loss["step"].tolist() == sorted(iters)
        assert loss["value"].tolist() == [round(iters[i][0], 4) for i in sorted(iters)]
        for series, k in (("train", 0), ("val", 1)):
            ev = run.evals[run.evals["series"] == series].sort_values("step")
            assert ev["step"].tolist() == sorted(evals)
            assert ev["loss"].tolist() == [round(evals[i][k], 4) for i in sorted(evals)]
        extra = run.meta["extra_scalars"]
        mfu = extra[extra["series"] == "mfu_percent"]
        assert mfu["step"].tolist() == [i for i in sorted(iters) if i >= 5]  # -100% = not yet measured
        ms = extra[extra["series"] == "iter_time_ms"]
        assert ms["value"].tolist() == [round(iters[i][1] * 1000, 2) for i in sorted(iters)]
        assert not list(run.warnings)


def test_stdout_log_resume_rewinds(tmp_path: Path) -> None:
    """A run resumed from its checkpoint at iter 20 restarts the log there: the later points win."""
    from loaders.detect import open_run
    iters, evals = _points(30)
    first = {i: v for i, v in iters.items() if i < 25}
    second = {i: (v[0] + 1.0, v[1], v[2]) for i, v in iters.items() if i >= 20}
    log = tmp_path / "train.log"
    log.write_text(nanogpt_stdout(first, {}) + nanogpt_stdout(second, {}))
    loss = open_run(log).series("loss")
    assert loss["step"].tolist() == list(range(30))
    want = [round(first[i][0], 4) if i < 20 else round(second[i][0], 4) for i in range(30)]
    assert loss["value"].tolist() == want


def test_working_folder_is_one_run(tmp_path: Path) -> None:
    """RUN/ with out/ckpt.pt, the stdout saved to a file and data/<dataset>/: one nanoGPT run with
    its checkpoint at iter_num and every logged point, never a comparison of one run."""
    from analyze.pipeline.compare import expand_runs
    from loaders.detect import detect_format, open_run
    run_dir = tmp_path / "nanogpt"
    iters, evals = _points(30)
    p = save_ckpt(run_dir / "out" / "ckpt.pt", nanogpt_state(), iter_num=20)
    (run_dir / "train_stdout.txt").write_text(nanogpt_stdout(iters, evals, saves=(10, 20)))
    data = run_dir / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (data / "val.bin").write_bytes(bytes(64))
    (data / "prepare.py").write_text("# nanoGPT's prepare script\n")
    assert detect_format(run_dir) == "nanogpt"
    assert expand_runs([run_dir]) == [run_dir]
    run = open_run(run_dir)
    assert [(c.step, c.path) for c in run.checkpoints] == [(20, p)]
    assert run.series("loss")["step"].tolist() == sorted(iters)
    assert sorted(set(run.evals["series"])) == ["train", "val"]
    assert run.model is not None and run.model.name == "nanogpt"
    assert not list(run.warnings)
