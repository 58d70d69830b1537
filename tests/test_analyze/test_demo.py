"""The built-in demo: MiniGPT size, corpus properties, the CLI entry points."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from click.testing import CliRunner

from analyze.cli import main
from analyze.demo import corpus
from analyze.demo.model import MiniGPT, MiniGPTConfig


def test_minigpt_has_about_103k_parameters() -> None:
    model = MiniGPT(MiniGPTConfig(vocab_size=len(corpus.vocabulary()), context=corpus.CONTEXT))
    n = model.num_parameters()
    by_hand = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert n == by_hand
    assert abs(n - 103_000) / 103_000 < 0.10


def test_minigpt_exposes_attention_probabilities_and_ffn_activation() -> None:
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=30, context=16)).eval()
    seen = {}
    model.blocks[0].attn.probs.register_forward_hook(lambda m, i, o: seen.__setitem__("p", o))
    model.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    model(torch.randint(0, 30, (3, 16)))
    p = seen["p"]
    assert p.shape == (3, 4, 16, 16) and seen["h"].shape == (3, 16, 256)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, 16))
    assert torch.all(p.triu(diagonal=1) == 0)  # causal


def test_corpus_is_deterministic_balanced_and_split_by_template() -> None:
    train, val = corpus.build_examples("train"), corpus.build_examples("val")
    assert train == corpus.build_examples("train")
    assert not {e.text for e in train} & {e.text for e in val}
    for split in (train, val):
        assert {e.verb for e in split} == set(corpus.REGULAR) | set(corpus.IRREGULAR)
        counts = Counter(e.class_id for e in split)
        assert counts[1] / len(split) == len(corpus.IRREGULAR) / 20
    assert all(e.text.startswith(e.prompt + e.target) for e in train + val)
    assert corpus.sentence("yesterday", True, "we", "be").target == "were"
    assert corpus.sentence("yesterday", True, "she", "study").target == "studied"
    enc = corpus.encode(val[:5], corpus.vocabulary())
    vocab = corpus.vocabulary()
    for i, ex in enumerate(val[:5]):  # the masked next-tokens spell the past-tense form
        chars = "".join(vocab[t] for t in enc.targets[i][enc.target_mask[i]].tolist())
        assert chars == ex.target


def test_cli_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "report", "audit", "spectral"):
        assert name in result.output


def test_demo_command_trains_and_writes_a_run(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--steps", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MiniGPT:" in result.output and "parameters" in result.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"]["name"] == "minigpt" and meta["class_names"] == ["regular", "irregular"]
    assert (out / "checkpoints" / "step_00000020.safetensors").exists()
    assert (out / "report" / "report.html").exists()
