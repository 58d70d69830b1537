"""Evaluation-data readers: the restricted pickle reader (plain data read, code refused), text /
JSONL / val.bin / safetensors sequences, sampling bounds, and the tokenizer messages."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from analyze.models import ModelSource, text_encoder
from analyze.pipeline.probe import eval_batch_indices
from loaders.errors import TrainauditError
from loaders.evaldata import EvalLimits, TextEncoder, eval_class_names, load_eval_data, read_plain_pickle


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_pickle_matches_pickle_for_every_protocol(tmp_path: Path, protocol: int) -> None:
    chars = list("\n !$&',-.3:;?ABCabcé")
    value = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)},
             "extra": [1.5, None, True, (1, 2), 2**70, -3]}
    p = tmp_path / "meta.pkl"
    p.write_bytes(pickle.dumps(value, protocol=protocol))
    assert read_plain_pickle(p) == value


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_plain_pickle_refuses_code(tmp_path: Path) -> None:
    p = tmp_path / "meta.pkl"
    p.write_bytes(pickle.dumps({"stoi": {"a": 0}, "x": _Boom()}))
    with pytest.raises(TrainauditError, match="never unpickles code"):
        read_plain_pickle(p)


def _words(texts: list[str]) -> list[list[int]]:
    return [[len(w) for w in t.split()] for t in texts]


ENC = TextEncoder(_words, 0, "word lengths")


def test_text_lines_are_padded_and_shifted(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("aa bbb c\n\nd ee\nfff gggg hh iiiii jj\n")
    d = load_eval_data(p, lambda: ENC, EvalLimits(seq_len=4))
    assert d.input_ids.tolist() == [[2, 3, 1, 0], [1, 2, 0, 0], [3, 4, 2, 5]]
    assert d.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert d.targets[:, :-1].tolist() == d.input_ids[:, 1:].tolist()
    assert d.target_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert d.class_ids is None


def test_jsonl_classes_in_first_seen_order_and_sampling_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    rows = [{"text": "x " * (1 + i % 5), "class": ["hard", "easy", "mid"][i % 3]} for i in range(50)]
    rows.append({"text": "no class here"})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_class_names(p) == ("hard", "easy", "mid")
    d = load_eval_data(p, lambda: ENC, EvalLimits(max_sequences=20, seed=1))
    assert d.input_ids.shape[0] == 20 and d.class_names == ("hard", "easy", "mid")
    again = load_eval_data(p, lambda: ENC, EvalLimits(max_sequences=20, seed=1))
    assert torch.equal(d.input_ids, again.input_ids)  # seeded
    assert set(d.class_ids.tolist()) <= {-1, 0, 1, 2}
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"label": 3}\n')
    with pytest.raises(TrainauditError, match=r"b.jsonl:2: no string field 'text'"):
        load_eval_data(bad, lambda: ENC)


def test_val_bin_windows_are_consecutive_tokens(tmp_path: Path) -> None:
    toks = np.arange(1000, dtype=np.uint16) % 97
    p = tmp_path / "val.bin"
    toks.tofile(p)
    d = load_eval_data(p, None, EvalLimits(max_sequences=8, seq_len=10, seed=0))
    assert d.input_ids.shape == (8, 10) and bool(d.target_mask.all())
    for row, tgt in zip(d.input_ids.tolist(), d.targets.tolist()):
        start = next(s for s in range(len(toks) - 10) if toks[s:s + 10].tolist() == row)
        assert tgt == toks[start + 1:start + 11].tolist()


def test_nanogpt_text_without_meta_or_local_gpt2_vocab_says_what_to_pass(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nohf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    src = ModelSource("nanogpt", path=str(tmp_path / "out" / "ckpt.pt"), dataset="openwebtext")
    with pytest.raises(TrainauditError, match="GPT-2 BPE.*pass --eval-data a token file"):
        text_encoder(src, [tmp_path])


def test_eval_batch_for_rho_is_a_seeded_sample_of_the_whole_set() -> None:
    idx = eval_batch_indices(320, 32, seed=0)
    assert len(idx) == 32 and len(set(idx.tolist())) == 32 and bool((idx[1:] > idx[:-1]).all())
    assert int(idx.max()) > 160  # not the first rows (one template in our own eval set)
    assert torch.equal(idx, eval_batch_indices(320, 32, seed=0))
    assert eval_batch_indices(10, 32, seed=0).tolist() == list(range(10))
