"""The forward-pass panels on real (tiny) transformers models saved with save_pretrained: dead
units, head entropy, per-class loss and tau from `analyze_run(..., eval_data=...)` against an
independent computation with plain torch hooks and `output_attentions` on the model transformers
itself loads; planted dead units; an encoder gets no LM panels."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from analyze.config import AnalysisConfig  # noqa: E402
from analyze.pipeline.analysis import analyze_run  # noqa: E402

EPS = 1e-3
WORDS_A = "the cat sat on a mat and the dog ran far".split()
WORDS_B = "green birds sing softly in tall old trees near rivers".split()


def _tokenizer(folder: Path, lines: list[str]) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    return tok


def _examples(n: int = 24) -> list[dict]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        words = WORDS_A if i % 2 == 0 else WORDS_B
        k = int(rng.integers(3, 12))  # different lengths: padding must be left out
        out.append({"text": " ".join(rng.choice(words, size=k)), "class": "A" if i % 2 == 0 else "B"})
    return out


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    ex = _examples()
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in ex))
    gpt, bert = root / "gpt2", root / "bert"
    gpt.mkdir()
    bert.mkdir()
    tok = _tokenizer(gpt, [e["text"] for e in ex])
    shutil.copy(gpt / "tokenizer.json", bert / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=tok.get_vocab_size())
    transformers.GPT2LMHeadModel(cfg).save_pretrained(gpt)
    bcfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, vocab_size=tok.get_vocab_size())
    transformers.BertModel(bcfg).save_pretrained(bert)
    planted = root / "gpt2-planted"
    shutil.copytree(gpt, planted)
    from safetensors.torch import load_file, save_file

    sd = load_file(planted / "model.safetensors")
    units = [3, 17, 40, 41, 99]
    w, b = sd["transformer.h.0.mlp.c_fc.weight"], sd["transformer.h.0.mlp.c_fc.bias"]  # Conv1D: (in, out)
    w[:, units] = 0.0
    b[units] = -1e4  # GELU(-1e4) = 0 on every token
    save_file(sd, planted / "model.safetensors", metadata={"format": "pt"})
    return {"gpt": gpt, "bert": bert, "planted": planted, "data": data, "examples": ex, "tok": tok,
            "n_planted": len(units)}


def _batch(tok, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [e.ids for e in tok.encode_batch([x["text"] for x in examples])]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask


def _reference(folder: Path, cls: type, act_path: str, tok, examples: list[dict], causal: bool) -> dict:
    """Dead units, per-head mean entropy and (LM) per-example losses with hooks on the model
    transformers loads itself."""
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = _batch(tok, examples)
    acts: dict[int, torch.Tensor] = {}
    layers = model.transformer.h if causal else model.encoder.layer
    hooks = [eval(f"layer.{act_path}", {"layer": layer}).register_forward_hook(
        lambda m, i, o, k=k: acts.__setitem__(k, o.detach())) for k, layer in enumerate(layers)]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask.long(), output_attentions=True)
    for h in hooks:
        h.remove()
    real = mask.numpy()
    dead = {k: int((np.abs(a.numpy())[real].max(axis=0) < EPS).sum()) for k, a in acts.items()}
    lengths = mask.sum(1).numpy()
    ent = {}
    for k, att in enumerate(out.attentions):
        p = att.double().numpy()  # (B, H, L, L)
        e = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)  # (B, H, L)
        q = np.arange(p.shape[2])
        n_vis = np.minimum(q[None, :] + 1, lengths[:, None]) if causal else np.broadcast_to(lengths[:, None],
                                                                                             (len(p), len(q)))
        elig = (q[None, :] < lengths[:, None]) & (n_vis >= 2)  # (B, L)
        ent[k] = np.array([e[:, h][elig].mean() for h in range(p.shape[1])])
    ref = {"dead": dead, "entropy": ent}
    if causal:
        logits = out.logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
        tmask = (mask[:, 1:] & mask[:, :-1]).numpy()
        ref["example_loss"] = np.array([-lp[i][tmask[i]].mean() for i in range(len(ids))])
    return ref


def test_gpt2_dead_units_entropy_class_loss_and_tau_match_hooks(hf_runs: dict) -> None:
    res = analyze_run(hf_runs["gpt"], AnalysisConfig(eval_data=str(hf_runs["data"]), workers=1))
    ref = _reference(hf_runs["gpt"], transformers.GPT2LMHeadModel, "mlp.act", hf_runs["tok"], hf_runs["examples"],
                     causal=True)
    dn = res.tables["dead_neurons"]
    assert list(dn["layer"]) == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert list(dn["dead_count"]) == [ref["dead"][0], ref["dead"][1]]
    assert set(dn["d_ff"]) == {128} and set(dn["n_tokens"]) == {int(sum(len(e["text"].split())
                                                                        for e in hf_runs["examples"]))}
    att = res.tables["attention"]
    assert len(att) == 2 * 4
    for k in (0, 1):
        got = att[att["layer"] == k].sort_values("head")["mean_entropy"].to_numpy()
        np.testing.assert_allclose(got, ref["entropy"][k], rtol=1e-5)
    cl = res.tables["class_losses"]
    cl = cl[cl["source"] == "checkpoint"].set_index("cls")
    classes = np.array([e["class"] for e in hf_runs["examples"]])
    for c in ("A", "B"):
        assert cl.loc[c, "mean"] == pytest.approx(ref["example_loss"][classes == c].mean(), rel=1e-5)
        assert cl.loc[c, "count"] == (classes == c).sum()
    tau = res.tables["tau"]
    row = tau[tau["source"] == "checkpoint"].iloc[0]
    assert (row["class_a"], row["class_b"]) == ("A", "B")  # the first two classes seen
    want = ref["example_loss"][classes == "A"].mean() - ref["example_loss"][classes == "B"].mean()
    assert row["tau"] == pytest.approx(want, rel=1e-5, abs=1e-9)
    ev = res.tables["eval_set"]
    assert len(ev) == 1 and math.isfinite(ev["mean_log_z"].iloc[0])
    assert len(res.tables["attention_logits"]) == 2
    gr = res.tables["grad_ratio"]
    assert len(gr) and set(gr["source"]) == {"evaluation batch"}
    assert res.panels["dead_neurons"] == "" and res.panels["attention"] == ""


def test_classes_option_chooses_the_tau_pair(hf_runs: dict) -> None:
    res = analyze_run(hf_runs["gpt"], AnalysisConfig(eval_data=str(hf_runs["data"]), workers=1, class_pair=("B", "A")))
    row = res.tables["tau"][res.tables["tau"]["source"] == "checkpoint"].iloc[0]
    cl = res.tables["class_losses"].set_index("cls")
    assert (row["class_a"], row["class_b"]) == ("B", "A")
    assert row["tau"] == pytest.approx(cl.loc["B", "mean"] - cl.loc["A", "mean"], rel=1e-9)


def test_planted_dead_units_raise_only_that_layers_count_by_exactly_the_number_planted(hf_runs: dict) -> None:
    cfg = AnalysisConfig(eval_data=str(hf_runs["data"]), workers=1)
    before = analyze_run(hf_runs["gpt"], cfg).tables["dead_neurons"].set_index("layer")["dead_count"]
    after = analyze_run(hf_runs["planted"], cfg).tables["dead_neurons"].set_index("layer")["dead_count"]
    assert after["transformer.h.0.mlp.act"] - before["transformer.h.0.mlp.act"] == hf_runs["n_planted"]
    assert after["transformer.h.1.mlp.act"] == before["transformer.h.1.mlp.act"]
    ref = _reference(hf_runs["planted"], transformers.GPT2LMHeadModel, "mlp.act", hf_runs["tok"],
                     hf_runs["examples"], causal=True)
    assert list(after) == [ref["dead"][0], ref["dead"][1]] and ref["dead"][0] >= hf_runs["n_planted"]


def test_bert_encoder_gets_every_panel_but_the_lm_ones(hf_runs: dict) -> None:
    res = analyze_run(hf_runs["bert"], AnalysisConfig(eval_data=str(hf_runs["data"]), workers=1))
    ref = _reference(hf_runs["bert"], transformers.BertModel, "intermediate.intermediate_act_fn", hf_runs["tok"],
                     hf_runs["examples"], causal=False)
    dn = res.tables["dead_neurons"]
    assert list(dn["layer"]) == ["encoder.layer.0.intermediate.intermediate_act_fn",
                                 "encoder.layer.1.intermediate.intermediate_act_fn"]
    assert list(dn["dead_count"]) == [ref["dead"][0], ref["dead"][1]]
    att = res.tables["attention"]
    for k in (0, 1):
        got = att[att["layer"] == k].sort_values("head")["mean_entropy"].to_numpy()
        np.testing.assert_allclose(got, ref["entropy"][k], rtol=1e-5)
    assert len(res.tables["activations"]) == 2 and len(res.tables["attention_logits"]) == 2
    assert res.tables["eval_set"].empty and res.tables["grad_ratio"].empty
    assert res.tables["class_losses"].empty
    assert any("no next-token head" in n for n in res.notes)


def test_audit_eval_data_reports_the_planted_dead_units(hf_runs: dict) -> None:
    from click.testing import CliRunner

    from analyze.cli import main

    res = CliRunner().invoke(main, ["audit", str(hf_runs["planted"]), "--eval-data", str(hf_runs["data"]),
                                    "--classes", "B,A", "--json"])
    assert res.exit_code in (0, 1), res.output
    found = json.loads(res.output[res.output.index("["):])
    dead = [f for f in found if f["code"] == "dead_neurons"]
    assert [f["tensor"] for f in dead] == ["transformer.h.0.mlp.act"]
    assert f"{hf_runs['n_planted']} of 128 units dead" in dead[0]["message"]


def test_report_cli_eval_data_and_a_bad_classes_value(hf_runs: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from analyze.cli import main

    res = CliRunner().invoke(main, ["report", str(hf_runs["gpt"]), "--out", str(tmp_path / "r"), "--workers", "1",
                                    "--eval-data", str(hf_runs["data"]), "--classes", "A,B"])
    assert res.exit_code == 0, res.output
    tau = (tmp_path / "r" / "tables" / "tau.csv").read_text().splitlines()
    assert tau[0].startswith("source") and ",A,B," in tau[1]
    bad = CliRunner().invoke(main, ["report", str(hf_runs["gpt"]), "--out", str(tmp_path / "r2"),
                                    "--eval-data", str(hf_runs["data"]), "--classes", "A"])
    assert bad.exit_code == 2 and "--classes must be two different class names" in bad.output


def test_without_transformers_the_panels_say_what_to_install(hf_runs: dict, monkeypatch) -> None:
    import sys

    from analyze.models import ModelUnavailable, find_model, rebuild

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ModelUnavailable, match=r"pip install 'trainaudit\[hf\]'"):
        rebuild(find_model(hf_runs["gpt"]))


def test_config_with_custom_code_is_refused_not_run(tmp_path: Path) -> None:
    from analyze.models import ModelUnavailable, find_model, rebuild

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilModel"],
                                                      "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="never runs|custom code"):
        rebuild(find_model(tmp_path))
