"""Evaluation data for the model pass: our own eval_set.safetensors, and for foreign runs a plain
text file (one example per line), JSONL (a text field, an optional class field) or a nanoGPT
token file (``val.bin``, uint16), each turned into one `EvalSet`.

Text is tokenised by the checkpoint's own tokenizer: ``tokenizer.json`` through the `tokenizers`
library, or nanoGPT's ``meta.pkl`` character vocabulary, read by a restricted reader of the pickle
opcodes that accepts plain dicts, lists, strings and numbers only (no code is ever run).

Defaults (`EvalLimits`): at most 256 sequences of at most 128 tokens (cut to the model's context),
chosen uniformly at random with seed 0 when the file holds more; token files give 256 random
windows. Sequences keep file order.

Just over 400 lines on purpose: the five formats share one sampling, padding and class path,
and the restricted pickle reader belongs beside its only user.
"""
from __future__ import annotations

import json
import os
import pickletools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loaders.errors import TrainauditError
from loaders.safeio import check_regular, open_regular

__all__ = ["EvalSet", "EvalLimits", "TextEncoder", "load_eval_set", "load_eval_data", "read_plain_pickle",
           "char_encoder", "json_encoder", "eval_class_names", "gpt2_tokenizer_file", "TEXT_FIELDS", "CLASS_FIELDS"]

TEXT_FIELDS = ("text",)               # JSONL: the example's text
CLASS_FIELDS = ("class", "label")     # JSONL: its class (optional), first field found
_MAX_PICKLE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Evaluation sequences, shifted so position t predicts targets[:, t] (§7)."""

    input_ids: torch.Tensor       # (N, L) int64
    targets: torch.Tensor         # (N, L) int64
    target_mask: torch.Tensor     # (N, L) bool: positions whose next token is a target token
    attention_mask: torch.Tensor  # (N, L) bool: real (non-padding) tokens
    class_ids: torch.Tensor | None  # (N,) int64
    class_names: tuple[str, ...] = ()   # names of class_ids, when the data names them (JSONL)
    notes: tuple[str, ...] = ()         # what the reader did (sampling, dropped characters)


@dataclass(frozen=True, slots=True)
class EvalLimits:
    """Bounds of the model pass: sequences, tokens per sequence, sampling seed."""

    max_sequences: int = 256
    seq_len: int = 128
    seed: int = 0


@dataclass(frozen=True)
class TextEncoder:
    """A tokenizer reduced to what the readers need: text -> token ids, the padding id, its source."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    pad_id: int
    source: str
    dropped: Callable[[], int] = field(default=lambda: 0)   # characters the vocabulary lacked


# --------------------------------------------------------------------------- our own format


def load_eval_set(path: Path, max_examples: int | None = None) -> EvalSet:
    """Read our eval_set.safetensors (input_ids, target_mask, optional targets, attention_mask,
    class_ids). Without `targets`, position t predicts input_ids[:, t+1]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainauditError(path, f"cannot read the evaluation set ({exc})") from None
    for need in ("input_ids", "target_mask"):
        if need not in t:
            raise TrainauditError(path, f"evaluation set has no {need!r} tensor")
    ids = t["input_ids"].to(torch.int64)
    mask = t["target_mask"].to(torch.bool)
    if ids.dim() != 2:
        raise TrainauditError(path, f"input_ids must be (N, L), got {tuple(ids.shape)}")
    if "targets" in t:
        targets = t["targets"].to(torch.int64)
    else:  # the next token; the last position has none
        targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        if mask.shape == ids.shape:
            mask = mask.clone()
            mask[:, -1] = False
    if mask.shape != ids.shape or targets.shape != ids.shape:
        raise TrainauditError(path, f"target_mask {tuple(mask.shape)} / targets {tuple(targets.shape)} "
                                    f"do not match input_ids {tuple(ids.shape)}")
    att = t["attention_mask"].to(torch.bool) if "attention_mask" in t else torch.ones_like(ids, dtype=torch.bool)
    if att.shape != ids.shape:
        raise TrainauditError(path, f"attention_mask {tuple(att.shape)} does not match input_ids {tuple(ids.shape)}")
    cls = t["class_ids"].to(torch.int64) if "class_ids" in t else None
    if cls is not None and cls.shape != ids.shape[:1]:
        raise TrainauditError(path, f"class_ids {tuple(cls.shape)} does not match {ids.shape[0]} examples")
    if max_examples is not None:
        ids, targets, mask, att = ids[:max_examples], targets[:max_examples], mask[:max_examples], att[:max_examples]
        cls = None if cls is None else cls[:max_examples]
    return EvalSet(ids, targets, mask, att, cls)


# --------------------------------------------------------------------------- tokenizers


_PICKLE_OPS = {
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "DICT", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS", "BININT", "BININT1",
    "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "UNICODE", "NONE", "NEWTRUE", "NEWFALSE", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT",
    "GET", "BINGET", "LONG_BINGET", "POP", "POP_MARK",
}
_MARK = object()


def read_plain_pickle(path: str | os.PathLike[str]) -> object:
    """The value of a pickle that holds only dicts, lists, tuples, strings, numbers, bools and None.

    The opcodes are decoded with `pickletools.genops` and interpreted here; any opcode that would
    import or call something (GLOBAL, REDUCE, BUILD, ...) is refused, so no code ever runs.
    """
    st = check_regular(path)
    if st.st_size > _MAX_PICKLE_BYTES:
        raise TrainauditError(path, f"{st.st_size:,} bytes is too large for a vocabulary pickle")
    with open_regular(path) as f:
        data = f.read()
    stack: list[object] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list[object]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise ValueError("MARK missing")

    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name not in _PICKLE_OPS:
                raise TrainauditError(path, f"the pickle holds {name} (an object or code, not plain data): "
                                            "refused, trainaudit never unpickles code")
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                break
            if name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name in ("EMPTY_LIST",):
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                items = stack[-k:]
                del stack[-k:]
                stack.append(tuple(items))
            elif name == "APPEND":
                v = stack.pop()
                stack[-1].append(v)  # type: ignore[union-attr]
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)  # type: ignore[union-attr]
            elif name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                stack[-1][k] = v  # type: ignore[index]
            elif name == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2], strict=True))  # type: ignore[union-attr]
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            else:  # numbers and strings: genops decoded the argument
                stack.append(arg)
    except TrainauditError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise TrainauditError(path, f"not a readable plain-data pickle ({exc})") from None
    if len(stack) != 1:
        raise TrainauditError(path, "not a readable plain-data pickle (no single value)")
    return stack[0]


def char_encoder(meta_path: str | os.PathLike[str]) -> TextEncoder:
    """nanoGPT's character vocabulary (``meta.pkl``: stoi) as an encoder; characters it lacks are
    dropped and counted."""
    meta = read_plain_pickle(meta_path)
    stoi = meta.get("stoi") if isinstance(meta, dict) else None
    if not isinstance(stoi, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in stoi.items()):
        raise TrainauditError(meta_path, "meta.pkl has no 'stoi' dict of str -> int (not a character vocabulary)")
    lost = [0]

    def encode_batch(texts: list[str]) -> list[list[int]]:
        out = []
        for t in texts:
            ids = [stoi[c] for c in t if c in stoi]
            lost[0] += len(t) - len(ids)
            out.append(ids)
        return out

    return TextEncoder(encode_batch, 0, f"{meta_path} (character vocabulary, {len(stoi)} symbols)",
                       lambda: lost[0])


def json_encoder(tokenizer_json: str | os.PathLike[str]) -> TextEncoder:
    """A ``tokenizer.json`` through the `tokenizers` library (special tokens added as the
    tokenizer's post-processor says)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TrainauditError(tokenizer_json, "reading tokenizer.json needs the tokenizers library: "
                                              "pip install 'trainaudit[hf]'") from None
    check_regular(tokenizer_json)
    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer_json))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception
        raise TrainauditError(tokenizer_json, f"not a readable tokenizer.json ({' '.join(str(exc).split())[:200]})") \
            from None
    tok.no_truncation()
    tok.no_padding()
    pad = tok.padding["pad_id"] if tok.padding else None
    if pad is None:
        for name in ("[PAD]", "<pad>", "<|endoftext|>"):
            pid = tok.token_to_id(name)
            if pid is not None:
                pad = pid
                break

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts)]

    return TextEncoder(encode_batch, int(pad or 0), f"{tokenizer_json}")


def gpt2_tokenizer_file(search: Sequence[Path]) -> Path | None:
    """A local GPT-2 ``tokenizer.json``: in the given folders, then the Hugging Face cache
    (``models--gpt2`` or ``models--openai-community--gpt2``). None when there is none (offline,
    nothing can be downloaded)."""
    for d in search:
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    for repo in ("models--gpt2", "models--openai-community--gpt2"):
        for f in sorted((hub / repo / "snapshots").glob("*/tokenizer.json")):
            return f
    return None


# --------------------------------------------------------------------------- readers


def _sample(n: int, limits: EvalLimits) -> np.ndarray:
    """Indices of at most max_sequences of n items, uniformly at random (seeded), in file order."""
    if n <= limits.max_sequences:
        return np.arange(n)
    rng = np.random.default_rng(limits.seed)
    return np.sort(rng.choice(n, size=limits.max_sequences, replace=False))


def _read_examples(path: Path) -> tuple[list[str], list[str] | None]:
    """(texts, classes or None) of a text or JSONL file; empty lines skipped."""
    check_regular(path)
    with open_regular(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainauditError(path, f"not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [ln for ln in lines if ln.strip()], None
    texts, classes = [], []
    any_class = False
    for no, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except ValueError as exc:
            raise TrainauditError(f"{path}:{no}", f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TrainauditError(f"{path}:{no}", "each line must be a JSON object with a 'text' field")
        t = next((obj[k] for k in TEXT_FIELDS if isinstance(obj.get(k), str)), None)
        if t is None:
            raise TrainauditError(f"{path}:{no}", "no string field 'text'")
        c = next((obj[k] for k in CLASS_FIELDS if k in obj and obj[k] is not None), None)
        any_class |= c is not None
        texts.append(t)
        classes.append("" if c is None else str(c))
    return texts, (classes if any_class else None)


def eval_class_names(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names a JSONL evaluation file uses, in first-seen order (() for other files)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        return ()
    _texts, classes = _read_examples(p)
    return tuple(dict.fromkeys(c for c in classes if c)) if classes else ()


def _token_windows(path: Path, limits: EvalLimits) -> EvalSet:
    """Random windows of a nanoGPT token file (uint16): input x[s:s+L], targets x[s+1:s+L+1]."""
    st = check_regular(path)
    if st.st_size < 4 or st.st_size % 2:
        raise TrainauditError(path, f"{st.st_size} bytes is not a uint16 token file of at least 2 tokens")
    toks = np.memmap(path, dtype=np.uint16, mode="r")
    seq = min(limits.seq_len, len(toks) - 1)
    n_start = len(toks) - seq
    rng = np.random.default_rng(limits.seed)
    n = min(limits.max_sequences, n_start)
    starts = np.sort(rng.choice(n_start, size=n, replace=False)) if n_start > n else np.arange(n_start)
    idx = starts[:, None] + np.arange(seq + 1)[None, :]
    win = torch.from_numpy(np.asarray(toks[idx], dtype=np.int64))
    ids, targets = win[:, :-1].contiguous(), win[:, 1:].contiguous()
    ones = torch.ones_like(ids, dtype=torch.bool)
    return EvalSet(ids, targets, ones, ones.clone(), None,
                   notes=(f"evaluation data: {len(ids)} random windows of {seq} tokens from {path} "
                          f"({len(toks):,} tokens; seed {limits.seed})",))


def load_eval_data(path: str | os.PathLike[str], encoder: Callable[[], TextEncoder] | None,
                   limits: EvalLimits = EvalLimits()) -> EvalSet:
    """Read ``--eval-data``: ``*.safetensors`` (ours), ``*.bin`` (nanoGPT uint16 tokens), ``*.jsonl``
    (text + optional class), anything else a text file of one example per line.

    ``encoder`` is called only for text (so a token file needs no tokenizer); its errors say what
    to pass instead. Sequences are cut to ``limits.seq_len`` tokens and right-padded.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return load_eval_set(p, limits.max_sequences)
    if suffix == ".bin":
        return _token_windows(p, limits)
    texts, classes = _read_examples(p)
    if not texts:
        raise TrainauditError(p, "no examples (every line is empty)")
    class_names: tuple[str, ...] = ()
    if classes is not None:
        class_names = tuple(dict.fromkeys(c for c in classes if c))
    keep = _sample(len(texts), limits)
    enc = encoder() if encoder is not None else None
    if enc is None:
        raise TrainauditError(p, "no tokenizer for this checkpoint, so text cannot be tokenised; pass a token file")
    seqs = enc.encode_batch([texts[i] for i in keep])
    lengths = np.array([min(len(s), limits.seq_len) for s in seqs])
    ok = lengths >= 1
    if not ok.any():
        raise TrainauditError(p, f"no example has a token the tokenizer ({enc.source}) knows")
    keep, lengths = keep[ok], lengths[ok]
    seqs = [s[:limits.seq_len] for s, good in zip(seqs, ok) if good]
    width = int(lengths.max())
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    pos = np.arange(width)[None, :]
    real = pos < lengths[:, None]
    ids_np = np.full((len(seqs), width), enc.pad_id, dtype=np.int64)
    ids_np[real] = flat  # row-major fill matches the concatenation order
    ids = torch.from_numpy(ids_np)
    att = torch.from_numpy(real)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], enc.pad_id)], dim=1)
    tmask = torch.from_numpy(pos + 1 < lengths[:, None])
    cls = None
    if classes is not None:
        index = {c: i for i, c in enumerate(class_names)}
        cls = torch.tensor([index.get(classes[i], -1) for i in keep], dtype=torch.int64)
    notes = [f"evaluation data: {len(seqs)} of {len(texts)} example(s) from {p}"
             + (f" (sampled with seed {limits.seed})" if len(texts) > limits.max_sequences else "")
             + f", tokenised by {enc.source}, cut to {limits.seq_len} tokens"
             + (f"; {int((lengths == limits.seq_len).sum())} were longer" if (lengths == limits.seq_len).any() else "")]
    if enc.dropped():
        notes.append(f"evaluation data: {enc.dropped()} character(s) not in the vocabulary were dropped")
    if cls is not None and bool((cls < 0).any()):
        notes.append(f"evaluation data: {int((cls < 0).sum())} example(s) without a class are left out of "
                     "the per-class losses")
    return EvalSet(ids, targets, tmask, att, cls, class_names, tuple(notes))
