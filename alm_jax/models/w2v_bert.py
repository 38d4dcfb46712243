"""W2V-BERT 2.0 (HF `Wav2Vec2BertModel`) in Flax NNX: a Conformer over stacked log-mel fbank frames.

    input_features [batch, frames, 160] (alm_jax.audio.fbank: 80-bin kaldi fbank, 2 frames stacked, 50 Hz)
      -> feature_projection (LayerNorm(160), Linear(160 -> d)) -> padded frames zeroed
      -> L Conformer blocks: x + 0.5 ffn1(LN x); x + self_attn(LN x); x + conv_module(x); x + 0.5 ffn2(LN x); LN
      -> last_hidden_state [batch, frames, d]

Self-attention positions (`position_embeddings_type`): "relative_key" (HF's default and facebook/w2v-bert-2.0:
Shaw et al. learned distance embeddings, distances clipped to [-left_max, right_max]), "relative"
(Transformer-XL sinusoidal relative positions with pos_bias_u / pos_bias_v), "rotary" (rotary embedding of
the block input before the q/k projections, as HF does), or None. The conv module is GLU -> causal depthwise
conv (left padding) -> LayerNorm -> activation -> pointwise conv; padded frames are zeroed before it.

Output (`W2VBertOutput`): `hidden_states` with HF's indexing (L + 1 entries; [0] = the projected input with
padding zeroed, [i] = output of block i), `block_outputs` = hidden_states[1:] (L entries; for the ALM's
"blocks" tap indexing) and `last_hidden_state` (= hidden_states[L]; the CTC adapter is not supported).
`config` exposes `encoder_layers` and `d_model` like the Whisper encoder's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alm_jax.errors import AudioError, ConfigError
from alm_jax.models.layers import LayerNorm, Linear, param

ACTIVATIONS = {"swish": jax.nn.silu, "silu": jax.nn.silu, "relu": jax.nn.relu,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
POSITION_TYPES = ("relative_key", "relative", "rotary", None)


@dataclasses.dataclass(frozen=True)
class W2VBertConfig:
    """The architecture fields of an HF `Wav2Vec2BertConfig` (defaults = HF's = facebook/w2v-bert-2.0)."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    feature_projection_input_dim: int = 160
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    position_embeddings_type: str | None = "relative_key"
    rotary_embedding_base: float = 10000.0
    max_source_positions: int = 5000
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8
    conv_depthwise_kernel_size: int = 31

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"w2v-bert: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"w2v-bert: hidden_act={self.hidden_act!r} is not supported; "
                              f"use one of {sorted(ACTIVATIONS)}")
        if self.position_embeddings_type not in POSITION_TYPES:
            raise ConfigError(f"w2v-bert: position_embeddings_type={self.position_embeddings_type!r} is not one of "
                              f"{POSITION_TYPES}")
        if self.conv_depthwise_kernel_size % 2 == 0:
            raise ConfigError("w2v-bert: conv_depthwise_kernel_size must be odd (HF requires it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def encoder_layers(self) -> int:   # the name the ALM reads (as on WhisperEncoderConfig)
        return self.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "W2VBertConfig":
        """From an HF `config.json` dict of model_type "wav2vec2-bert" (missing keys take HF's defaults). The
        CTC adapter (`add_adapter`, `use_intermediate_ffn_before_adapter`) is refused."""
        if config.get("model_type", "wav2vec2-bert") != "wav2vec2-bert":
            raise ConfigError(f"model_type={config.get('model_type')!r} is not a W2V-BERT (wav2vec2-bert) config")
        if config.get("add_adapter") or config.get("use_intermediate_ffn_before_adapter"):
            raise ConfigError("w2v-bert: checkpoints with the CTC adapter (add_adapter=true) are not supported; use "
                              "the base encoder (e.g. facebook/w2v-bert-2.0)")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in config and config[f.name] is not None:
                kw[f.name] = config[f.name]
            elif f.name == "position_embeddings_type" and f.name in config:
                kw[f.name] = None
        ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "feature_projection_input_dim", "max_source_positions", "left_max_position_embeddings",
                "right_max_position_embeddings", "conv_depthwise_kernel_size")
        return cls(**{k: (int(v) if k in ints else v) for k, v in kw.items()})


@struct.dataclass
class W2VBertOutput:
    """`last_hidden_state` `[batch, frames, d]`; `hidden_states` (HF indexing, L + 1 entries) and
    `block_outputs` (= hidden_states[1:], L entries), each `[batch, frames, d]`."""
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    block_outputs: tuple[jax.Array, ...]


def sinusoidal_relative_table(length: int, d: int) -> np.ndarray:
    """HF `Wav2Vec2BertRelPositionalEmbedding` for `length` frames: `[2 length - 1, d]` float32, row k for
    relative position r = length - 1 - k (query i, key j: r = i - j), sin in even and cos in odd channels,
    angles computed in float32 as torch does."""
    div = np.exp(np.arange(0, d, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d))).astype(np.float32)
    r = (length - 1 - np.arange(2 * length - 1)).astype(np.float32)
    angle = np.abs(r)[:, None] * div[None, :]                     # float32, like torch
    sign = np.where(r < 0, -1.0, 1.0).astype(np.float32)[:, None]
    out = np.empty((2 * length - 1, d), np.float32)
    out[:, 0::2] = sign * np.sin(angle)
    out[:, 1::2] = np.cos(angle)
    return out


class W2VBertFeedForward(nnx.Module):
    """output_dense(act(intermediate_dense(x))): `[..., d]` -> `[..., d]`."""

    def __init__(self, cfg: W2VBertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.intermediate_dense = Linear(d, f, axes=("audio_embed", "audio_mlp"), **kw)
        self.output_dense = Linear(f, d, axes=("audio_mlp", "audio_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class W2VBertSelfAttention(nnx.Module):
    """Multi-head self-attention with the configured position scheme (see the module doc)."""

    def __init__(self, cfg: W2VBertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype = cfg, dtype
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.linear_q = Linear(d, d, axes=("audio_embed", "audio_heads"), **kw)
        self.linear_k = Linear(d, d, axes=("audio_embed", "audio_heads"), **kw)
        self.linear_v = Linear(d, d, axes=("audio_embed", "audio_heads"), **kw)
        self.linear_out = Linear(d, d, axes=("audio_heads", "audio_embed"), **kw)
        pos = cfg.position_embeddings_type
        if pos == "relative_key":
            n = cfg.left_max_position_embeddings + cfg.right_max_position_embeddings + 1
            self.distance_embedding = param(nnx.initializers.normal(0.02)(rngs.params(), (n, self.head_dim),
                                                                           param_dtype), ("audio_pos", "head_dim"))
        elif pos == "relative":
            self.linear_pos = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
            self.pos_bias_u = param(jnp.zeros((self.heads, self.head_dim), param_dtype), (None, "head_dim"))
            self.pos_bias_v = param(jnp.zeros((self.heads, self.head_dim), param_dtype), (None, "head_dim"))

    def _rotary(self, x: jax.Array) -> jax.Array:
        """HF rotates the block input `[b, t, d]`, viewed as heads, before the q/k projections."""
        b, t, d = x.shape
        hd = self.head_dim
        inv = 1.0 / (self.cfg.rotary_embedding_base ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
        freqs = np.arange(t, dtype=np.float32)[:, None] * inv.astype(np.float32)[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.asarray(np.cos(emb), x.dtype)[:, None], jnp.asarray(np.sin(emb), x.dtype)[:, None]
        xh = x.reshape(b, t, self.heads, hd)
        rotated = jnp.concatenate([-xh[..., hd // 2:], xh[..., :hd // 2]], axis=-1)
        return (xh * cos + rotated * sin).reshape(b, t, d)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x `[b, t, d]`, mask `[b, t]` bool (True = real frame; padded keys are ignored) -> `[b, t, d]`."""
        b, t, _ = x.shape
        scale = self.head_dim ** -0.5
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        pos = self.cfg.position_embeddings_type
        qk_in = self._rotary(x) if pos == "rotary" else x
        q, k, v = split(self.linear_q(qk_in)), split(self.linear_k(qk_in)), split(self.linear_v(x))
        bias = None
        if pos == "relative_key":
            left, right = self.cfg.left_max_position_embeddings, self.cfg.right_max_position_embeddings
            dist = np.clip(np.arange(t)[None, :] - np.arange(t)[:, None], -left, right) + left    # [t, t]
            table = self.distance_embedding[...].astype(q.dtype)                                    # [P, hd]
            per_pos = jnp.einsum("bqhd,pd->bhqp", q, table, preferred_element_type=jnp.float32)   # [b, h, t, P]
            bias = jnp.take_along_axis(per_pos, jnp.asarray(dist)[None, None], axis=-1) * scale
        elif pos == "relative":
            table = jnp.asarray(sinusoidal_relative_table(t, self.cfg.hidden_size), self.dtype)
            p = self.linear_pos(table).reshape(2 * t - 1, self.heads, self.head_dim)
            qv = q + self.pos_bias_v[...].astype(q.dtype)
            per_pos = jnp.einsum("bqhd,khd->bhqk", qv, p, preferred_element_type=jnp.float32)      # [b, h, t, 2t-1]
            idx = (t - 1) - np.arange(t)[:, None] + np.arange(t)[None, :]                            # rel = i - j
            bias = jnp.take_along_axis(per_pos, jnp.asarray(idx)[None, None], axis=-1) * scale
            q = q + self.pos_bias_u[...].astype(q.dtype)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.linear_out(out.reshape(b, t, self.heads * self.head_dim))


class W2VBertConvolutionModule(nnx.Module):
    """LN -> zero padded frames -> pointwise_conv1 (d -> 2d) -> GLU -> causal depthwise conv -> LN -> act ->
    pointwise_conv2. Pointwise kernels `[in, out]`; depthwise kernel `[width, 1, d]` (torch `[d, 1, width]`)."""

    def __init__(self, cfg: W2VBertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, w = cfg.hidden_size, cfg.conv_depthwise_kernel_size
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype, self.width, self.act = dtype, w, ACTIVATIONS[cfg.hidden_act]
        self.layer_norm = LayerNorm(d, **ln)
        self.pointwise_conv1 = Linear(d, 2 * d, axes=("audio_embed", "audio_mlp"), **kw)
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.depthwise_conv = param(init(rngs.params(), (w, 1, d), param_dtype), ("conv_kernel", None, "audio_embed"))
        self.depthwise_layer_norm = LayerNorm(d, **ln)
        self.pointwise_conv2 = Linear(d, d, axes=("audio_embed", None), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x `[b, t, d]`, mask `[b, t]` bool -> `[b, t, d]`."""
        h = self.layer_norm(x)
        if mask is not None:
            h = jnp.where(mask[..., None], h, 0)
        a, gate = jnp.split(self.pointwise_conv1(h), 2, axis=-1)
        h = a * jax.nn.sigmoid(gate)
        h = jax.lax.conv_general_dilated(
            h.astype(self.dtype), self.depthwise_conv[...].astype(self.dtype), window_strides=(1,),
            padding=[(self.width - 1, 0)], dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=h.shape[-1])
        return self.pointwise_conv2(self.act(self.depthwise_layer_norm(h)))


class W2VBertEncoderLayer(nnx.Module):
    """One Conformer block (HF `Wav2Vec2BertEncoderLayer`; names mirror it)."""

    def __init__(self, cfg: W2VBertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ffn1_layer_norm = LayerNorm(d, **ln)
        self.ffn1 = W2VBertFeedForward(cfg, **kw)
        self.self_attn_layer_norm = LayerNorm(d, **ln)
        self.self_attn = W2VBertSelfAttention(cfg, **kw)
        self.conv_module = W2VBertConvolutionModule(cfg, **kw)
        self.ffn2_layer_norm = LayerNorm(d, **ln)
        self.ffn2 = W2VBertFeedForward(cfg, **kw)
        self.final_layer_norm = LayerNorm(d, **ln)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x `[b, t, d]`, mask `[b, t]` bool or None -> `[b, t, d]`."""
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.conv_module(x, mask)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


class W2VBertFeatureProjection(nnx.Module):
    """LayerNorm over the stacked fbank features, then Linear to the model width."""

    def __init__(self, cfg: W2VBertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        f = cfg.feature_projection_input_dim
        self.layer_norm = LayerNorm(f, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.projection = Linear(f, cfg.hidden_size, axes=("mel", "audio_embed"), use_bias=True, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(self.layer_norm(x))


class W2VBertModel(nnx.Module):
    """`model(input_features [batch, frames, 160], attention_mask [batch, frames] | None)` -> `W2VBertOutput`."""

    def __init__(self, cfg: W2VBertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.feature_projection = W2VBertFeatureProjection(cfg, **kw)
        self.layers = nnx.List([W2VBertEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, input_features: jax.Array, attention_mask: jax.Array | None = None) -> W2VBertOutput:
        cfg = self.config
        if input_features.ndim != 3 or input_features.shape[2] != cfg.feature_projection_input_dim:
            raise AudioError(f"w2v-bert expects input_features [batch, frames, {cfg.feature_projection_input_dim}], "
                             f"got {input_features.shape}; compute them with alm_jax.audio.fbank.w2v_bert_features")
        x = self.feature_projection(input_features.astype(self.dtype))
        mask = None if attention_mask is None else attention_mask.astype(bool)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        return W2VBertOutput(last_hidden_state=x, hidden_states=tuple(hidden), block_outputs=tuple(hidden[1:]))
