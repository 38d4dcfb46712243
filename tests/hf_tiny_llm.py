"""Tiny random HF decoder LMs (Llama / Qwen2 / Qwen3) saved with `save_pretrained`, for parity tests.

Every parameter is randomized (norm scales around 1, biases non-zero), so a mis-mapped norm or bias cannot
hide behind its default initialization.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers
from flax import nnx

CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_hf_llm(family: str, *, tied: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer GQA model (hidden 64, 4 heads, 2 kv heads, vocab 128) with random float32 weights."""
    config_cls, model_cls = CLASSES[family]
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "qwen3":
        kwargs["head_dim"] = 24  # explicit head_dim != hidden / heads
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def jit_forward(model: nnx.Module):
    """model(ids, attention_mask=mask, **kw) as a jitted function of (ids, mask, **kw), returning numpy."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, kw):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, **kw)

    return lambda ids, mask=None, **kw: np.asarray(run(state, ids, mask, kw))


def torch_logits(model, ids, mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long),
                    position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)))
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths: list[int], vocab: int = 128):
    """(ids `[b, max_len]`, mask, position_ids, rows) with each row's tokens at the right end; position_ids
    as HF `generate` builds them (cumsum - 1, 0 on padding); rows = the unpadded token lists."""
    width = max(lengths)
    rows = [rng.integers(0, vocab, size=n) for n in lengths]
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    position_ids = np.maximum(mask.cumsum(1) - 1, 0)
    return ids, mask, position_ids, rows
