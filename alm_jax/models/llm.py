"""Decoder-only language models of the Llama family: Llama (incl. Llama-3.1 `llama3` rope scaling),
Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm, explicit head_dim), built from an HF config.

    model = load_llm("path/to/hf_dir")          # alm_jax.load_llm (weights/llm_params.py): strict import
    logits = model(input_ids, attention_mask=mask)         # [batch, time, vocab] float32
    new_tokens = generate_greedy(model, input_ids, mask, max_new_tokens=16)

Padding: `attention_mask` `[batch, time]` (1 = token) masks keys, and the default positions count only real
tokens, so a left-padded row gives the logits of the unpadded one. Packing: `segment_ids` `[batch, time]`
restrict attention to the query's own segment, and positions restart per segment. Decoding: pass a
`KVCache` (`model.init_cache`) and take the returned one; the cache is a pytree, made for `jax.jit`.
Parameter names mirror HF (`layers.3.self_attn.q_proj.kernel`), so the key table stays readable.

Layers (`models/stack.py`): scanned by default (`scan_layers=True`: one `DecoderBlock` whose parameters are
stacked `[num_layers, ...]`, at `layers.self_attn.q_proj.kernel`, run by one `lax.scan`, so the block is
traced and compiled once instead of once per layer) or unrolled (`layers.3.self_attn...`). The KV cache is
stacked the same way in both forms. `remat` ("none" | "full" | "save_dots") checkpoints each block for the
backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.errors import WeightImportError
from alm_jax.models.layers import (ROPE_TYPES, Attention, Embed, KVCache, Linear, RMSNorm, SwiGLU, causal_mask,
                                   positions_from_mask, positions_from_segments, rope_inv_freq)
from alm_jax.models.stack import check_remat, make_stack, run_stack
from alm_jax.sharding import ACTIVATION_AXES, constrain

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture of a decoder LM; `from_hf` reads an HF `config.json` dict."""
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, cfg: dict) -> "LLMConfig":
        """From an HF config dict. Rope settings are read from `rope_parameters` (transformers >= 5) or
        `rope_scaling` + `rope_theta` (older files); a sliding window is ignored with a warning."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise WeightImportError(f"LLM model_type {model_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            base = dict(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                        num_heads=heads)
        except KeyError as e:
            raise WeightImportError(f"{model_type} config lacks {e.args[0]!r}; is this a complete config.json?") from e
        if cfg.get("hidden_act", "silu") != "silu":
            raise WeightImportError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        default_head_dim = 128 if model_type == "qwen3" else hidden // heads  # the transformers defaults
        attention_bias = bool(cfg.get("attention_bias", False))
        family = {
            "llama": dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(cfg.get("mlp_bias", False))),
            "qwen2": dict(qkv_bias=True),
            "qwen3": dict(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True),
        }[model_type]
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", True):
            warnings.warn(f"{model_type}: sliding_window={window} is ignored; attention is full over the sequence")
        max_positions = int(cfg.get("max_position_embeddings", 4096))
        return cls(model_type=model_type, **base, **family,
                   num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or default_head_dim),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   max_position_embeddings=max_positions, **_rope_fields(cfg, max_positions))

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies `[head_dim // 2]`."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_type, factor=self.rope_factor,
                             low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                             original_max_positions=self.rope_original_max_positions)


def _rope_fields(cfg: dict, max_positions: int) -> dict:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise WeightImportError(f"per-layer-type rope parameters {sorted(params)} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise WeightImportError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    return dict(rope_type=rope_type, rope_theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rope_factor=float(params.get("factor", 1.0)),
                rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                rope_original_max_positions=int(original or max_positions))


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias, qk_norm=cfg.qk_norm,
                                   norm_eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, **attn_kwargs):
        """x `[b, t, embed]` -> (`[b, t, embed]`, (k, v)); attn_kwargs go to `Attention`."""
        h, kv = self.self_attn(self.input_layernorm(x), **attn_kwargs)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class DecoderLM(nnx.Module):
    """Token embedding -> blocks -> final RMSNorm -> LM head (the embedding when tied).

    Parameters: embed_tokens.embedding `[vocab, embed]` ('vocab', 'embed'); per block the `Attention` and
    `SwiGLU` kernels (see layers.py) and norms ('norm',), with a leading `[num_layers]` axis ('layers') when
    scanned; lm_head.kernel `[embed, vocab]` ('embed', 'vocab').
    """

    def __init__(self, cfg: LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = True, remat: str = "none"):
        self.cfg, self.dtype, self.remat = cfg, dtype, check_remat(remat)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = make_stack(lambda r: DecoderBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                 cfg.num_layers, scan=scan_layers, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids `[b, t]` -> `[b, t, embed]` (where other modalities splice into `inputs_embeds`)."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        cfg = self.cfg
        return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype or self.dtype)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                      segment_ids=None, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states `[b, t, embed]` and the updated cache (None without one).

        input_ids `[b, t]` or inputs_embeds `[b, t, embed]`; attention_mask `[b, t]` (1 = token; with a cache
        it covers only these t new tokens); positions `[b, t]` override the defaults (from the mask, from
        the segments, or continuing the cache); segment_ids `[b, t]` (not with a cache).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            default_positions = (positions_from_mask(mask) if segment_ids is None
                                 else positions_from_segments(segment_ids))
            attn_mask = causal_mask(mask, segment_ids)
        elif segment_ids is not None:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        else:
            default_positions, attn_mask, new_cache = cache.append_tokens(mask)
        positions = default_positions if positions is None else positions
        kwargs = dict(positions=positions, inv_freq=self.cfg.inv_freq(), mask=attn_mask)
        if cache is None:
            x, _ = run_stack(self.layers, lambda block, h, _: (constrain(block(h, **kwargs)[0], ACTIVATION_AXES), None),
                             constrain(x, ACTIVATION_AXES), remat=self.remat)
            return self.norm(x), None

        def body(block, carry, layer):   # the stacked cache rides in the carry: written in place, slot by slot
            h, keys, values = carry
            h, (keys, values) = block(h, kv_cache=(keys, values), layer=layer, write_at=cache.end, **kwargs)
            return (h, keys, values), None
        layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (x, keys, values), _ = run_stack(self.layers, body, (x, cache.keys, cache.values), layers, remat=self.remat)
        return self.norm(x), dataclasses.replace(new_cache, keys=keys, values=values)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden `[b, t, embed]` -> logits `[b, t, vocab]` float32 (accumulated in float32)."""
        h = hidden.astype(self.dtype)
        if self.lm_head is None:   # tied: contract with the [vocab, embed] table as stored (no transposed copy)
            w = self.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        return jnp.dot(h, self.lm_head.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 segment_ids=None, cache: KVCache | None = None):
        """Logits `[b, t, vocab]` float32, or (logits, cache) when a cache is given. See `hidden_states`."""
        hidden, cache_out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                               positions=positions, segment_ids=segment_ids, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache_out)


def generate_greedy(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    max_new_tokens: int = 16, eos_id: int | None = None) -> jax.Array:
    """Greedy decoding with a KV cache, jitted (prefill + `lax.while_loop`, static shapes).

    input_ids `[b, t]`, left-padded when rows differ in length (attention_mask `[b, t]`, 1 = token).
    Returns the new tokens `[b, max_new_tokens]` int32; after a row emits `eos_id` it is filled with eos_id,
    and the loop stops early once every row has.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    graphdef, state = nnx.split(model)
    return _generate_greedy(graphdef, state, input_ids, mask, max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "eos_id"))
def _generate_greedy(graphdef, state, input_ids, mask, *, max_new_tokens: int, eos_id: int | None):
    model = nnx.merge(graphdef, state)
    return greedy_decode(model, model.embed(input_ids), mask, max_new_tokens=max_new_tokens, eos_id=eos_id)


def greedy_decode(model: DecoderLM, inputs_embeds: jax.Array, mask: jax.Array, *, max_new_tokens: int,
                  eos_id: int | None) -> jax.Array:
    """Traceable greedy decoding from prompt embeddings `[b, t, embed]` (left-padded, mask `[b, t]`):
    prefill into a KV cache, then a `lax.while_loop` of one-token steps. Returns `[b, max_new_tokens]`
    int32. Other modalities call this with their spliced embeddings (see models/alm.py)."""
    b, t = mask.shape
    fill = -1 if eos_id is None else eos_id
    logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=mask,
                          cache=model.init_cache(b, t + max_new_tokens))
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(token)

    def unfinished(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        step, token, cache, out, done = carry
        logits, cache = model(token[:, None], cache=cache)
        token = jnp.where(done, fill, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, token, cache, out, done | (token == fill)

    carry = (jnp.int32(1), token, cache, out, token == fill)
    return jax.lax.while_loop(unfinished, decode_one, carry)[3]
