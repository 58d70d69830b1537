"""A Llama-shaped bf16 checkpoint folder sharded as Hugging Face saves it, for the weight benchmarks.

    python benchmarks/_llama_weights.py OUT_DIR [--size 1.1b|124m|10m] [--shard-gb 1.0]

Writes ``config.json``, ``model.safetensors.index.json`` and ``model-0000k-of-0000n.safetensors``
(bfloat16; the names, shapes and order of ``LlamaForCausalLM``: q/k/v/o with grouped KV heads,
gate/up/down, RMSNorm weights, untied ``lm_head``). The 1.1B layout is TinyLlama-1.1B's (22
layers, d 2048, MLP 5632, 4 KV heads of 64, vocabulary 32000). Matrices have a trained-like
spectrum (``_gpt2_weights.trained_matrix``: spikes, sigma_2 / sigma_1 0.93-0.99, over a noise
bulk), scaled to std ~0.02; generation is ~1 min for 1.1B on 2 cores. Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt2_weights import trained_matrix  # noqa: E402

__all__ = ["LLAMA_SIZES", "LlamaLayout", "write_llama"]


@dataclass(frozen=True, slots=True)
class LlamaLayout:
    n_layer: int
    d: int
    ffn: int
    n_head: int
    n_kv: int
    vocab: int

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, kv = self.d, self.n_kv * (self.d // self.n_head)
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.n_layer):
            h = f"model.layers.{i}."
            out += [(h + "self_attn.q_proj.weight", (d, d)), (h + "self_attn.k_proj.weight", (kv, d)),
                    (h + "self_attn.v_proj.weight", (kv, d)), (h + "self_attn.o_proj.weight", (d, d)),
                    (h + "mlp.gate_proj.weight", (self.ffn, d)), (h + "mlp.up_proj.weight", (self.ffn, d)),
                    (h + "mlp.down_proj.weight", (d, self.ffn)),
                    (h + "input_layernorm.weight", (d,)), (h + "post_attention_layernorm.weight", (d,))]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (self.vocab, d))]
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes())

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.d,
                "intermediate_size": self.ffn, "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv, "vocab_size": self.vocab,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "hidden_act": "silu"}


LLAMA_SIZES = {"1.1b": LlamaLayout(22, 2048, 5632, 32, 4, 32000),     # 1,100,048,384 parameters
               "124m": LlamaLayout(12, 768, 2048, 12, 4, 32000),      # ~124M
               "10m": LlamaLayout(5, 320, 864, 8, 2, 8000)}           # ~10.6M


def _ratio(name: str) -> float:
    for key, r in (("q_proj", 0.99), ("k_proj", 0.985), ("v_proj", 0.97), ("o_proj", 0.98), ("gate", 0.95),
                   ("up_proj", 0.93), ("down", 0.96), ("embed", 0.9), ("lm_head", 0.9)):
        if key in name:
            return r
    return 0.95


def write_llama(out: str | Path, layout: LlamaLayout = LLAMA_SIZES["1.1b"], *, shard_gb: float = 1.0,
                seed: int = 0) -> Path:
    """Write the folder (module docstring); returns it. Shards hold whole tensors in model order,
    each at most ``shard_gb`` GB unless one tensor is larger (as ``save_pretrained`` splits)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    limit = int(shard_gb * 1e9)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout.shapes():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, items in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in items:
            if len(shape) == 1:
                t = 1.0 + 0.02 * torch.randn(shape, generator=g)
            else:
                t = trained_matrix(*shape, _ratio(name), g)
                t = t * (0.02 / float(t.std()))
            tensors[name] = t.to(torch.bfloat16).contiguous()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    total = sum(2 * math.prod(s) for _, s in layout.shapes())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(layout.config(), indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=sorted(LLAMA_SIZES), default="1.1b")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    lay = LLAMA_SIZES[args.size]
    write_llama(args.out, lay, shard_gb=args.shard_gb)
    print(f"{args.out}: {lay.n_params:,} parameters (bf16) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
