"""The verb-tense corpus of the formula sheet (§8): regular vs irregular verbs.

Each example is one sentence whose target is the past-tense form of a verb given in
brackets, e.g. ``"yesterday she (go) went."``. Character-level; deterministic for a seed.
Train and validation are split by held-out sentence *templates* (time phrases), not by
verb, so both splits contain every verb and both classes.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

REGULAR = {"work": "worked", "play": "played", "walk": "walked", "talk": "talked",
           "listen": "listened", "watch": "watched", "study": "studied", "finish": "finished",
           "start": "started", "look": "looked", "want": "wanted", "like": "liked"}
IRREGULAR = {"be": "was", "have": "had", "do": "did", "go": "went", "come": "came",
             "see": "saw", "eat": "ate", "write": "wrote"}
CLASS_NAMES = ("regular", "irregular")   # class ids 0 and 1
SUBJECTS = ("i", "you", "he", "she", "we", "they", "my friend", "the teacher")
_PLURAL = {"you", "we", "they"}
# (time phrase, phrase first?) : the sentence templates. The last two are held out for validation.
TEMPLATES = (
    ("yesterday", True), ("last week", True), ("last night", False), ("two days ago", False),
    ("last year", True), ("this morning", False), ("on monday", True), ("an hour ago", False),
    ("last summer", True), ("in 2010", False),
)
N_VAL_TEMPLATES = 2
PAD = "_"
CONTEXT = 48


def past_form(verb: str, subject: str) -> str:
    """The past-tense form; "be" agrees with its subject (was / were)."""
    if verb == "be":
        return "were" if subject in _PLURAL else "was"
    return REGULAR.get(verb) or IRREGULAR[verb]


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str      # "yesterday she (go) "
    target: str      # "went"
    text: str        # prompt + target + "."
    verb: str
    class_id: int    # 0 regular, 1 irregular


def sentence(time_phrase: str, phrase_first: bool, subject: str, verb: str) -> Example:
    target = past_form(verb, subject)
    lead = f"{time_phrase} " if phrase_first else ""
    tail = "" if phrase_first else f" {time_phrase}"
    prompt = f"{lead}{subject} ({verb}) "
    return Example(prompt, target, f"{prompt}{target}{tail}.", verb, int(verb in IRREGULAR))


def build_examples(split: str) -> list[Example]:
    """Every sentence of a split ("train" or "val"), in a fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    templates = TEMPLATES[:-N_VAL_TEMPLATES] if split == "train" else TEMPLATES[-N_VAL_TEMPLATES:]
    verbs = list(REGULAR) + list(IRREGULAR)
    return [sentence(t, first, s, v) for (t, first), s, v in itertools.product(templates, SUBJECTS, verbs)]


def vocabulary() -> list[str]:
    """Sorted characters of the whole corpus; index 0 is the padding character."""
    chars = {c for split in ("train", "val") for ex in build_examples(split) for c in ex.text}
    return [PAD, *sorted(chars - {PAD})]


@dataclass(frozen=True)
class EncodedSet:
    """A split as tensors. The model predicts token t+1 at position t:
    targets[n, t] = input_ids[n, t+1] and target_mask[n, t] marks positions whose next token
    belongs to the past-tense form (§7: only those count)."""

    input_ids: torch.Tensor     # (N, L) int64
    targets: torch.Tensor       # (N, L) int64, next token (pad where none)
    target_mask: torch.Tensor   # (N, L) bool
    attention_mask: torch.Tensor  # (N, L) bool, True on real (non-pad) tokens
    class_ids: torch.Tensor     # (N,) int64


def encode(examples: list[Example], vocab: list[str], context: int = CONTEXT) -> EncodedSet:
    index = {c: i for i, c in enumerate(vocab)}
    n = len(examples)
    ids = torch.zeros(n, context + 1, dtype=torch.long)
    mask = torch.zeros(n, context + 1, dtype=torch.bool)
    real = torch.zeros(n, context + 1, dtype=torch.bool)
    for i, ex in enumerate(examples):  # corpus building, not a hot path
        if len(ex.text) > context + 1:
            raise ValueError(f"sentence longer than the context: {ex.text!r}")
        ids[i, : len(ex.text)] = torch.tensor([index[c] for c in ex.text])
        start = len(ex.prompt)
        mask[i, start: start + len(ex.target)] = True
        real[i, : len(ex.text)] = True
    return EncodedSet(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask[:, 1:].contiguous(),
                      real[:, :-1].contiguous(),
                      torch.tensor([ex.class_id for ex in examples], dtype=torch.long))


def batches(data: EncodedSet, batch_size: int, seed: int):
    """Endless shuffled mini-batches (input_ids, targets, target_mask, class_ids), seeded."""
    g = torch.Generator().manual_seed(seed)
    n = data.input_ids.shape[0]
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i: i + batch_size]
            yield data.input_ids[idx], data.targets[idx], data.target_mask[idx], data.class_ids[idx]


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out
