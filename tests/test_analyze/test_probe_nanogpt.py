"""A nanoGPT working folder (out/ckpt.pt from a compiled run, data/<dataset>/val.bin and meta.pkl
as nanoGPT's prepare scripts write them): the model panels of the rebuilt GPT against a
functional forward pass written here from nanoGPT's equations, and planted dead units."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run

ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=0, dropout=0.0)
TEXT = "first citizen: before we proceed any further, hear me speak.\nall: speak, speak.\n" * 3


def _state(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, hid = ARGS["n_embd"], 4 * ARGS["n_embd"]

    def r(*shape: int, s: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.wte.weight": r(vocab, c), "transformer.wpe.weight": r(ARGS["block_size"], c)}
    for i in range(ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + r(c, s=0.05), p + "ln_1.bias": r(c, s=0.05),
               p + "attn.c_attn.weight": r(3 * c, c), p + "attn.c_attn.bias": r(3 * c, s=0.05),
               p + "attn.c_proj.weight": r(c, c), p + "attn.c_proj.bias": r(c, s=0.05),
               p + "ln_2.weight": 1 + r(c, s=0.05), p + "ln_2.bias": r(c, s=0.05),
               p + "mlp.c_fc.weight": r(hid, c), p + "mlp.c_fc.bias": r(hid, s=0.05),
               p + "mlp.c_proj.weight": r(c, hid), p + "mlp.c_proj.bias": r(c, s=0.05)}
    sd |= {"transformer.ln_f.weight": 1 + r(c, s=0.05), "transformer.ln_f.bias": r(c, s=0.05)}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, one storage
    return sd


def _reference(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """nanoGPT's forward, functionally: logits (B, T, V) and each layer's GELU output."""
    c, nh = ARGS["n_embd"], ARGS["n_head"]
    b, t = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:t]
    acts = []
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (c,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]).split(c, dim=2)
        q, k, v = (z.view(b, t, nh, c // nh).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // nh)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (c,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        a = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        acts.append(a)
        x = x + a @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (c,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    return x @ sd["transformer.wte.weight"].T, acts


def _workdir(root: Path, sd: dict[str, torch.Tensor], vocab: int) -> Path:
    out = root / "out"
    out.mkdir(parents=True)
    args = dict(ARGS, vocab_size=vocab)
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}  # torch.compile'd model's state dict
    torch.save({"model": compiled, "optimizer": {}, "model_args": args, "iter_num": 250, "best_val_loss": 1.5,
                "config": {"dataset": "shakespeare_char", "block_size": ARGS["block_size"]}}, out / "ckpt.pt")
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def nano(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("nanogpt")
    chars = sorted(set(TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = root / "work" / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    ids = np.array([stoi[ch] for ch in TEXT], dtype=np.uint16)
    ids[:60].tofile(data / "val.bin")  # 60 tokens: 44 windows of 16, all of them read
    with open(data / "meta.pkl", "wb") as f:  # exactly as nanoGPT's prepare.py writes it
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    sd = _state(len(chars), seed=1)
    ckpt = _workdir(root / "work", sd, len(chars))
    planted_sd = {k: v.clone() for k, v in sd.items()}
    planted_sd["lm_head.weight"] = planted_sd["transformer.wte.weight"]
    units = [0, 5, 6, 33]
    planted_sd["transformer.h.1.mlp.c_fc.weight"][units] = 0.0  # rows of the up-projection
    planted_sd["transformer.h.1.mlp.c_fc.bias"][units] = -1e4
    planted = _workdir(root / "planted", planted_sd, len(chars))
    return {"root": root, "ckpt": ckpt, "planted": planted, "sd": sd, "planted_sd": planted_sd,
            "val": data / "val.bin", "ids": ids[:60], "units": units, "stoi": stoi}


def _run(ckpt: Path, data: Path) -> object:
    return analyze_run(ckpt, AnalysisConfig(eval_data=str(data), eval_seq_len=16, workers=1))


def test_val_bin_loss_log_z_and_dead_units_match_a_functional_nanogpt(nano: dict) -> None:
    res = _run(nano["ckpt"], nano["val"])
    ids = torch.from_numpy(nano["ids"].astype(np.int64))
    win = torch.stack([ids[s:s + 17] for s in range(len(ids) - 16)])  # every window of 16 (+1 target)
    with torch.no_grad():
        logits, acts = _reference(nano["sd"], win[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1)).item()
    ev = res.tables["eval_set"].iloc[0]
    assert ev["step"] == 250 and ev["n_tokens"] == win[:, 1:].numel() and ev["n_examples"] == len(win)
    assert ev["loss"] == pytest.approx(want, rel=1e-5)
    assert ev["mean_log_z"] == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-5)
    dn = res.tables["dead_neurons"]
    assert list(dn["layer"]) == ["transformer.h.0.mlp.gelu", "transformer.h.1.mlp.gelu"]
    assert list(dn["dead_count"]) == [int((a.abs().amax(dim=(0, 1)) < 1e-3).sum()) for a in acts]
    assert res.tables["activations"]["layer"].tolist() == ["transformer.h.0", "transformer.h.1"]
    assert len(res.tables["attention"]) == ARGS["n_layer"] * ARGS["n_head"]


def test_planted_rows_raise_that_layers_dead_count_by_exactly_the_number_planted(nano: dict) -> None:
    before = _run(nano["ckpt"], nano["val"]).tables["dead_neurons"].set_index("layer")["dead_count"]
    after = _run(nano["planted"], nano["val"]).tables["dead_neurons"].set_index("layer")["dead_count"]
    assert after["transformer.h.1.mlp.gelu"] - before["transformer.h.1.mlp.gelu"] == len(nano["units"])
    assert after["transformer.h.0.mlp.gelu"] == before["transformer.h.0.mlp.gelu"]


def test_text_is_tokenised_by_the_runs_meta_pkl(nano: dict, tmp_path: Path) -> None:
    lines = ["hear me speak.", "all: speak!", "before we proceed"]  # "!" is not in the vocabulary
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n")
    res = analyze_run(nano["ckpt"], AnalysisConfig(eval_data=str(text), workers=1))
    stoi = nano["stoi"]
    enc = [[stoi[c] for c in ln if c in stoi] for ln in lines]
    width = max(map(len, enc))
    sd = nano["sd"]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in enc:  # one sequence at a time: no padding in the reference
            logits, _ = _reference(sd, torch.tensor([s]))
            total += F.cross_entropy(logits[0, :-1], torch.tensor(s[1:]), reduction="sum").item()
            count += len(s) - 1
    ev = res.tables["eval_set"].iloc[0]
    assert ev["n_tokens"] == count and width == max(len(s) for s in enc)
    assert ev["loss"] == pytest.approx(total / count, rel=1e-5)
    assert any("1 character(s) not in the vocabulary were dropped" in n for n in res.notes)
