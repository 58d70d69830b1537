"""Runs written by the real libraries (transformers Trainer, Lightning with CSVLogger and
TensorBoardLogger, torch's SummaryWriter, accelerate's save_state) and a nanoGPT working folder,
read back: every training and validation point, and every checkpoint at the step the library
recorded, is checked against what the writer was given (values captured in the training loop
itself, steps from the library's own hooks), and ``trainaudit report --strict`` exits 0.

Tiny CPU runs (a few steps, models of a few hundred parameters), written once per module.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from loaders.detect import detect_format, open_run
from loaders.run import Run

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")
accelerate = pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")


def _loss(run: Run) -> dict[int, float]:
    s = run.series("loss")
    return dict(zip(s["step"].tolist(), s["value"].tolist(), strict=True))


def _evals(run: Run, series: str) -> dict[int, float]:
    e = run.evals[run.evals["series"] == series]
    return dict(zip(e["step"].tolist(), e["loss"].tolist(), strict=True))


def _close(got: dict[int, float], want: dict[int, float], rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=rel, abs_tol=1e-9), (k, got[k], v)


def _no_data_warnings(path: Path) -> None:
    """What ``report --strict`` counts (the analysis's data warnings) is empty, and the library's
    own state files are listed as not analysed instead (the whole CLI once, in the HF test)."""
    from analyze.pipeline.analysis import analyze_run
    res = analyze_run(path, cache_dir=None)
    assert res.data_warnings == []
    assert res.summary["not_analysed"] == res.not_analysed


def _strict_report(path: Path, out: Path) -> None:
    from click.testing import CliRunner

    from analyze.cli import main
    res = CliRunner().invoke(main, ["report", str(path), "--out", str(out), "--strict", "--workers", "1",
                                    "--no-exact-svd"])
    assert res.exit_code == 0, res.output
    assert not (out / "comparison.json").exists()  # one run is one report, never a comparison


# --------------------------------------------------------------------------- transformers Trainer

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.x = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i], "labels": self.x[i]}

    seen: dict[str, Any] = {"logs": [], "saves": []}

    class Capture(TrainerCallback):  # what the Trainer itself logged and saved
        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            seen["logs"].append((state.global_step, dict(logs or {})))

        def on_save(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            seen["saves"].append(state.global_step)

    out = tmp_path_factory.mktemp("hf") / "final"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(out), max_steps=5, save_steps=2, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data(), callbacks=[Capture()])
    trainer.train()
    # The same run before the final save: only what the Trainer wrote on its own.
    plain = out.parent / "plain"
    plain.mkdir()
    for d in out.iterdir():
        shutil.copytree(d, plain / d.name)
    trainer.save_model()
    trainer.save_state()
    return {"final": out, "plain": plain, **seen}


def _hf_expected(seen: dict[str, Any]) -> tuple[dict[int, float], dict[int, float]]:
    train = {s: float(lg["loss"]) for s, lg in seen["logs"] if "loss" in lg}
    evals = {s: float(lg["eval_loss"]) for s, lg in seen["logs"] if "eval_loss" in lg}
    return train, evals


@pytest.mark.parametrize("layout", ["final", "plain"])
def test_hf_trainer_output_folder(hf_run: dict[str, Any], layout: str) -> None:
    folder = hf_run[layout]
    assert detect_format(folder) == "hf"
    run = open_run(folder)
    train, evals = _hf_expected(hf_run)
    assert len(train) == 5 and len(evals) == 3
    _close(_loss(run), train)
    _close(_evals(run, "eval_loss"), evals)
    # save_state's closing entry (train_loss over the whole run) is no training-loss point.
    summary = [lg for _, lg in hf_run["logs"] if "train_loss" in lg]
    assert len(summary) == 1 and _loss(run)[5] == pytest.approx(train[5]) != pytest.approx(summary[0]["train_loss"])
    # Exactly the checkpoints the Trainer saved, at its steps; the final save_model of the same
    # weights as checkpoint-5 is not a second checkpoint.
    assert [c.step for c in run.checkpoints] == sorted(set(hf_run["saves"])) == [2, 4, 5]
    assert [c.path.name for c in run.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert not list(run.warnings)
    assert {"checkpoint-2/optimizer.pt", "checkpoint-2/scheduler.pt", "checkpoint-2/rng_state.pth",
            "checkpoint-2/training_args.bin"} <= set(run.not_analysed)
    assert ("training_args.bin" in run.not_analysed) == (layout == "final")


def test_hf_single_files_take_their_folder_step(hf_run: dict[str, Any]) -> None:
    ck = hf_run["final"] / "checkpoint-4"
    assert [c.step for c in open_run(ck / "model.safetensors").checkpoints] == [4]
    alone = open_run(ck / "trainer_state.json")
    assert [(c.step, c.path) for c in alone.checkpoints] == [(4, ck)]
    assert sorted(_loss(alone)) == [1, 2, 3, 4]


def test_hf_strict_report(hf_run: dict[str, Any], tmp_path: Path) -> None:
    _strict_report(hf_run["final"], tmp_path / "r")


# --------------------------------------------------------------------------- Lightning

@pytest.fixture(scope="module")
def pl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    y = x.sum(1, keepdim=True)

    def loader() -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)

    out: dict[str, Any] = {}
    for kind in ("csv", "tb"):
        seen: dict[str, Any] = {"train": {}, "epoch_of": {}, "val": {}, "saved": []}

        class Net(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
                self.val_losses: list[float] = []

            def training_step(self, batch, i):  # type: ignore[no-untyped-def]
                loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
                self.log("train_loss", loss)
                seen["train"][self.global_step] = float(loss.detach())
                seen["epoch_of"][self.global_step] = self.current_epoch
                return loss

            def validation_step(self, batch, i):  # type: ignore[no-untyped-def]
                loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
                self.log("val_loss", loss)
                self.val_losses.append(float(loss))

            def on_validation_epoch_end(self) -> None:
                if not self.trainer.sanity_checking:  # equal batches: Lightning's epoch mean is the plain mean
                    seen["val"][self.current_epoch] = sum(self.val_losses) / len(self.val_losses)
                self.val_losses = []

            def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
                seen["saved"].append(checkpoint["global_step"])

            def configure_optimizers(self):  # type: ignore[no-untyped-def]
                return torch.optim.SGD(self.parameters(), lr=0.05)

        root = tmp_path_factory.mktemp(f"pl_{kind}")
        logger = CSVLogger(str(root)) if kind == "csv" else TensorBoardLogger(str(root))
        torch.manual_seed(0)
        trainer = L.Trainer(max_epochs=3, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                            callbacks=[ModelCheckpoint(every_n_epochs=1, save_top_k=-1, save_last=True)])
        trainer.fit(Net(), loader(), loader())
        out[kind] = {"root": root, **seen}
    return out


@pytest.mark.parametrize("kind", ["csv", "tb"])
def test_lightning_logs_and_checkpoints(pl_runs: dict[str, Any], kind: str) -> None:
    seen = pl_runs[kind]
    run = open_run(seen["root"])
    assert run.source_format == ("lightning" if kind == "csv" else "tensorboard")
    _close(_loss(run), seen["train"])
    # Lightning logs an epoch's validation at the step of that epoch's last training batch.
    last_step = {e: max(s for s, ep in seen["epoch_of"].items() if ep == e) for e in seen["val"]}
    _close(_evals(run, "val_loss"), {last_step[e]: v for e, v in seen["val"].items()})
    # ModelCheckpoint saved epoch=E-step=S.ckpt and last.ckpt (the same weights as the newest): one
    # checkpoint per global_step the module saw saved.
    assert [c.step for c in run.checkpoints] == sorted(set(seen["saved"])) == [4, 8, 12]
    assert all(c.path.name.startswith("epoch=") for c in run.checkpoints)
    assert not list(run.warnings) and run.not_analysed == []


def test_lightning_last_ckpt_alone_records_its_step(pl_runs: dict[str, Any]) -> None:
    last = next(pl_runs["csv"]["root"].rglob("last.ckpt"))
    assert [c.step for c in open_run(last).checkpoints] == [12]


@pytest.mark.parametrize("kind", ["csv", "tb"])
def test_lightning_strict(pl_runs: dict[str, Any], kind: str) -> None:
    _no_data_warnings(pl_runs[kind]["root"])


# --------------------------------------------------------------------------- torch SummaryWriter

@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("tb")
    writer = SummaryWriter(str(root / "logs"))
    (root / "checkpoints").mkdir()
    net = torch.nn.Linear(3, 2)
    train, val = {}, {}
    for step in range(1, 7):
        train[step] = 1.0 / step
        writer.add_scalar("train/loss", train[step], step)
        if step % 3 == 0:
            val[step] = 1.5 / step
            writer.add_scalar("val/loss", val[step], step)
            with torch.no_grad():
                net.weight.add_(1.0)
            if step == 3:  # the step in the name
                torch.save(net.state_dict(), root / "checkpoints" / "step_3.pt")
            else:          # the step only inside the file
                torch.save({"state_dict": net.state_dict(), "global_step": step}, root / "checkpoints" / "latest.pt")
    writer.close()
    return {"root": root, "train": train, "val": val}


def test_summary_writer_with_checkpoints_beside(tb_run: dict[str, Any]) -> None:
    run = open_run(tb_run["root"])
    assert run.source_format == "tensorboard"
    _close(_loss(run), tb_run["train"])
    _close(_evals(run, "val/loss"), tb_run["val"])
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(3, "step_3.pt"), (6, "latest.pt")]
    assert not list(run.warnings)
    _no_data_warnings(tb_run["root"])


# --------------------------------------------------------------------------- accelerate

@pytest.fixture(scope="module")
def acc_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    root = tmp_path_factory.mktemp("acc")
    acc = Accelerator(cpu=True, log_with="tensorboard",
                      project_config=ProjectConfiguration(project_dir=str(root), automatic_checkpoint_naming=True))
    acc.init_trackers("logs")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    net, opt, sched = acc.prepare(net, opt, sched)
    train, saved = {}, []
    for step in range(1, 7):
        loss = net(torch.randn(3, 4)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        train[step] = float(loss.detach())
        acc.log({"train_loss": train[step]}, step=step)
        if step % 2 == 0:
            acc.save_state()
            saved.append(step)
    acc.end_training()
    return {"root": root, "train": train, "saved": saved}


def test_accelerate_project_folder(acc_run: dict[str, Any]) -> None:
    root = acc_run["root"]
    run = open_run(root)
    assert run.source_format == "tensorboard"
    _close(_loss(run), acc_run["train"])
    # checkpoints/checkpoint_0..2 are one run's saves at the optimizer steps the scheduler counted,
    # not three runs and not steps 0, 1, 2.
    assert [c.step for c in run.checkpoints] == acc_run["saved"] == [2, 4, 6]
    assert [c.path.name for c in run.checkpoints] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    assert not list(run.warnings)
    assert {f"checkpoints/checkpoint_0/{n}" for n in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")} \
        <= set(run.not_analysed)
    from analyze.pipeline.compare import expand_runs
    ckdir = root / "checkpoints"
    assert expand_runs([ckdir]) == [ckdir]
    assert [c.step for c in open_run(ckdir).checkpoints] == [2, 4, 6]
    _no_data_warnings(root)


# --------------------------------------------------------------------------- nanoGPT working folder

def test_nanogpt_working_folder(tmp_path: Path) -> None:
    from nanogpt_log import nanogpt_stdout  # tests/nanogpt_log.py (pythonpath = tests)

    run_dir = tmp_path / "nanogpt"
    (run_dir / "out").mkdir(parents=True)
    n_embd, vocab, block = 8, 11, 6
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.wte.weight": torch.randn(vocab, n_embd, generator=g),
          "transformer.wpe.weight": torch.randn(block, n_embd, generator=g),
          "transformer.h.0.ln_1.weight": torch.ones(n_embd),
          "transformer.h.0.attn.c_attn.weight": torch.randn(3 * n_embd, n_embd, generator=g),
          "transformer.h.0.attn.c_proj.weight": torch.randn(n_embd, n_embd, generator=g),
          "transformer.h.0.ln_2.weight": torch.ones(n_embd),
          "transformer.h.0.mlp.c_fc.weight": torch.randn(4 * n_embd, n_embd, generator=g),
          "transformer.h.0.mlp.c_proj.weight": torch.randn(n_embd, 4 * n_embd, generator=g),
          "transformer.ln_f.weight": torch.ones(n_embd)}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model_args = {"n_layer": 1, "n_head": 2, "n_embd": n_embd, "block_size": block, "bias": False,
                  "vocab_size": vocab, "dropout": 0.0}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 20,
                "best_val_loss": torch.tensor(3.9), "config": {"dataset": "shakespeare_char"}},
               run_dir / "out" / "ckpt.pt")
    iters = {i: (4.0 - 0.03 * i, 0.01 + i / 1000, -1.0 if i < 5 else 0.02) for i in range(25)}
    evals = {0: (4.1, 4.12), 10: (3.8, 3.85), 20: (3.6, 3.9)}
    (run_dir / "train.log").write_text(nanogpt_stdout(iters, evals, saves=(10, 20)))
    (run_dir / "data" / "shakespeare_char").mkdir(parents=True)
    (run_dir / "data" / "shakespeare_char" / "val.bin").write_bytes(bytes(40))
    run = open_run(run_dir)
    assert run.source_format == "nanogpt"
    _close(_loss(run), {i: round(v[0], 4) for i, v in iters.items()})
    _close(_evals(run, "val"), {i: v[1] for i, v in evals.items()})
    _close(_evals(run, "train"), {i: v[0] for i, v in evals.items()})
    assert [(c.step, c.path) for c in run.checkpoints] == [(20, run_dir / "out" / "ckpt.pt")]
    assert not list(run.warnings)
    _no_data_warnings(run_dir)
