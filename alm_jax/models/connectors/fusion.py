"""ALARM multi-encoder fusion: cross-attention into the main stream (CA), per-encoder Perceivers whose
latents are prefixed to the main stream (P), element-wise sum, and the learned audio boundary vectors.

Reference: ALARM `fusion_implementations/{crossattention,perceiver}.py` (`MultiPerceiverFusion`),
`audio_fusion.py` (sum), `llm_audio_wrapper.py` (learned start/end embeddings).
Streams are adapter outputs `[batch, frames, dim]`; masks are `[batch, frames]` with True = valid frame.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.connectors.common import MultiHeadAttention, apply_dropout, gelu, make_dropout
from alm_jax.models.layers import LayerNorm, Linear, param


class AudioBoundary(nnx.Module):
    """Two learned vectors `[dim]` (start, end) wrapped around a clip's tokens.

    x `[batch, T, dim]`, lengths `[batch]` (valid tokens, optional) -> `[batch, T + 2, dim]` laid out
    `[start, x[:length], end, 0...]` (without lengths: `[start, x, end]`); new lengths are lengths + 2.
    """

    def __init__(self, dim: int, *, init_std: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.normal(init_std)
        self.start = param(init(rngs.params(), (dim,), param_dtype), ("conn_embed",))
        self.end = param(init(rngs.params(), (dim,), param_dtype), ("conn_embed",))

    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        start = jnp.broadcast_to(self.start[...].astype(self.dtype), (b, 1, d))
        end = jnp.broadcast_to(self.end[...].astype(self.dtype), (b, 1, d))
        if lengths is None:
            return jnp.concatenate([start, x.astype(self.dtype), end], axis=1)
        out = jnp.concatenate([start, x.astype(self.dtype), jnp.zeros_like(end)], axis=1)
        pos = jnp.arange(t + 2)[None, :, None]
        end_pos = (lengths + 1)[:, None, None]
        out = jnp.where(pos == end_pos, end, out)
        return jnp.where(pos > end_pos, 0, out)


class SumFusion(nnx.Module):
    """Element-wise sum of adapted streams `[batch, T, dim]` -> `[batch, T, dim]` (single-encoder models).

    Lengths must match; `pad_to_longest=True` zero-pads shorter streams first, as ALARM's `AudioFusion`
    does (its encoders can differ by one frame)."""

    def __init__(self, *, pad_to_longest: bool = False):
        self.pad_to_longest = pad_to_longest

    def __call__(self, streams: Sequence[jax.Array]) -> jax.Array:
        if not streams:
            raise ConfigError("SumFusion: got no streams to sum")
        lengths = [s.shape[1] for s in streams]
        if len(set(lengths)) > 1:
            if not self.pad_to_longest:
                raise ConfigError(f"SumFusion: streams have different lengths {lengths}; make the adapters "
                                  "produce equal frame counts or use SumFusion(pad_to_longest=True)")
            t = max(lengths)
            streams = [jnp.pad(s, ((0, 0), (0, t - s.shape[1]), (0, 0))) for s in streams]
        out = streams[0]
        for s in streams[1:]:
            out = out + s
        return out


# --------------------------------------------------------------------------------------------------
# Cross-attention fusion (ALARM-CA)

class PreNormDecoderLayer(nnx.Module):
    """`torch.nn.TransformerDecoderLayer(norm_first=True, activation=gelu, batch_first=True)`:

    x += drop(SelfAttn(LN1 x)); x += drop(CrossAttn(LN2 x, memory)); x += drop(W2 drop(gelu(W1 LN3 x))).
    x `[batch, T, d]`, memory `[batch, S, d]`, masks `[batch, T]` / `[batch, S]` (True = valid) -> `[batch, T, d]`.
    A batch row whose mask marks no key (ALARM-CA: a clip with 0 main-stream tokens, both masks coming from the
    main lengths) gets torch's zero attention context, its out projection's bias (`fully_masked="zero"`).
    """

    def __init__(self, d: int, heads: int, ffn: int, *, dropout: float = 0.1, eps: float = 1e-5,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1, self.norm2, self.norm3 = (LayerNorm(d, eps=eps, **kw) for _ in range(3))
        attn = dict(dropout=dropout, fully_masked="zero", rngs=rngs, **kw)   # torch MHA's all-masked row
        self.self_attn = MultiHeadAttention(d, d, d, heads, **attn)
        self.cross_attn = MultiHeadAttention(d, d, d, heads, **attn)
        self.linear1 = Linear(d, ffn, axes=("conn_embed", "conn_mlp"), use_bias=True, rngs=rngs, **kw)
        self.linear2 = Linear(ffn, d, axes=("conn_mlp", "conn_embed"), use_bias=True, rngs=rngs, **kw)
        self.dropout = make_dropout(dropout, rngs)

    def __call__(self, x: jax.Array, memory: jax.Array, x_mask: jax.Array | None = None,
                 memory_mask: jax.Array | None = None) -> jax.Array:
        h = self.norm1(x)
        x = x + apply_dropout(self.dropout, self.self_attn(h, h, x_mask))
        x = x + apply_dropout(self.dropout, self.cross_attn(self.norm2(x), memory, memory_mask))
        y = self.linear2(apply_dropout(self.dropout, gelu(self.linear1(self.norm3(x)))))
        return x + apply_dropout(self.dropout, y)


@dataclasses.dataclass(frozen=True)
class CrossAttentionFusionConfig:
    """ALARM-CA defaults: d=1024, 16 heads, FFN 4096, dropout 0.1, one layer per conditional encoder
    (`alarm_ca.yaml` `num_hidden_layers: [1,1,1]`; the paper notes say 2: set `layers_per_stream`)."""

    llm_dim: int = 2560
    d: int = 1024
    heads: int = 16
    ffn: int = 4096
    dropout: float = 0.1
    layers_per_stream: tuple[int, ...] = (1, 1, 1)   # one entry per conditional stream, in order
    skip_connection: bool = False                    # add in_proj(main) back before out_proj
    layer_norm_eps: float = 1e-5


class CrossAttentionFusion(nnx.Module):
    """Main stream (queries, e.g. Whisper) refined by cross-attending to each conditional stream in turn.

    main `[batch, T, llm_dim]`, conds: one `[batch, S_i, llm_dim]` per conditional stream, masks
    `[batch, T]` / `[batch, S_i]` (True = valid, optional) -> `[batch, T, llm_dim]` (main's length).
    Every stream first gets its own `in_proj` Linear(llm_dim -> d); `out_proj` maps d -> llm_dim.
    ALARM masks the main stream's self-attention keys and, with the same main-stream lengths, every
    conditional stream's keys (`get_padding_mask(cond_output, lengths[main_encoder])`): the connector passes
    those masks.
    """

    def __init__(self, cfg: CrossAttentionFusionConfig = CrossAttentionFusionConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        n = len(cfg.layers_per_stream)
        self.in_proj = nnx.List([Linear(cfg.llm_dim, cfg.d, axes=("conn_embed", "conn_embed"), use_bias=True,
                                        rngs=rngs, **kw) for _ in range(n + 1)])
        self.decoders = nnx.List([
            nnx.List([PreNormDecoderLayer(cfg.d, cfg.heads, cfg.ffn, dropout=cfg.dropout, eps=cfg.layer_norm_eps,
                                          rngs=rngs, **kw) for _ in range(k)])
            for k in cfg.layers_per_stream])
        self.out_proj = Linear(cfg.d, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True, rngs=rngs, **kw)

    def __call__(self, main: jax.Array, conds: Sequence[jax.Array], main_mask: jax.Array | None = None,
                 cond_masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
        if len(conds) != len(self.decoders):
            raise ConfigError(f"CrossAttentionFusion: built for {len(self.decoders)} conditional streams "
                              f"(layers_per_stream={self.cfg.layers_per_stream}), got {len(conds)}")
        cond_masks = list(cond_masks) if cond_masks is not None else [None] * len(conds)
        x0 = self.in_proj[0](main)
        x = x0
        for i, (cond, layers) in enumerate(zip(conds, self.decoders)):
            memory = self.in_proj[i + 1](cond)
            for layer in layers:
                x = layer(x, memory, main_mask, cond_masks[i])
        if self.cfg.skip_connection:
            x = x + x0
        return self.out_proj(x)

    @staticmethod
    def output_lengths(main_lengths):
        return main_lengths


# --------------------------------------------------------------------------------------------------
# Perceiver fusion (ALARM-P)

class _PerceiverMLP(nnx.Module):
    """LN -> Linear(d -> widening*d) -> GELU -> Linear(-> d). `[..., d]` -> `[..., d]`."""

    def __init__(self, d: int, widening: int, *, kernel_init, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Linear(d, widening * d, axes=("conn_embed", "conn_mlp"), use_bias=True, **kw)
        self.fc2 = Linear(widening * d, d, axes=("conn_mlp", "conn_embed"), use_bias=True, **kw)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(self.norm(x))))


class _PerceiverSelfLayer(nnx.Module):
    """x += SelfAttn(LN x); x += MLP(x). `[batch, latents, d]` -> same."""

    def __init__(self, d: int, heads: int, widening: int, dropout: float, *, kernel_init, dtype, param_dtype, rngs):
        self.norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.attn = MultiHeadAttention(d, d, d, heads, dropout=dropout, kernel_init=kernel_init, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.mlp = _PerceiverMLP(d, widening, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(x)


class _PerceiverCrossLayer(nnx.Module):
    """lat += CrossAttn(LN_q lat, LN_kv x, mask); lat += MLP(lat). lat `[batch, latents, d]`, x `[batch, S, kv_dim]`
    -> `[batch, latents, d]`."""

    def __init__(self, d: int, kv_dim: int, heads: int, widening: int, dropout: float, *, kernel_init, dtype,
                 param_dtype, rngs):
        self.q_norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype)
        self.kv_norm = LayerNorm(kv_dim, dtype=dtype, param_dtype=param_dtype)
        self.attn = MultiHeadAttention(d, kv_dim, d, heads, dropout=dropout, kernel_init=kernel_init, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.mlp = _PerceiverMLP(d, widening, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

    def __call__(self, lat, x, mask=None):
        lat = lat + self.attn(self.q_norm(lat), self.kv_norm(x), mask)
        return lat + self.mlp(lat)


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """One Perceiver encoder; defaults: ALARM-P (`alarm_p.yaml`, `perceiver-io`'s `PerceiverEncoder`): 20 latents
    x 768, 1 cross-attention layer (4 heads), 3 self-attention blocks of 6 layers (4 heads) sharing the first
    block's weights (`first_self_attention_block_shared: true`).

    Block i (0-based) is preceded by a cross-attention layer when i < `cross_layers`; blocks 1.. use the first
    block's weights when `shared_blocks`, else one second set (the `self_attn_n` of perceiver-io); likewise cross
    layers 1.. with `shared_cross`."""

    kv_dim: int = 1024
    n_latents: int = 20
    d: int = 768
    cross_heads: int = 4
    self_heads: int = 4
    self_layers_per_block: int = 6
    self_blocks: int = 3
    cross_layers: int = 1
    shared_blocks: bool = True
    shared_cross: bool = True
    widening: int = 1
    dropout: float = 0.0          # on the attention probabilities (perceiver-io `dropout`)
    init_scale: float = 0.02


class Perceiver(nnx.Module):
    """Learned latents `[n_latents, d]` cross-attend (pre-LN on latents and inputs) into x, then the
    self-attention blocks run (see `PerceiverConfig`). x `[batch, S, kv_dim]`, mask `[batch, S]` (True = valid)
    -> `[batch, n_latents, d]`."""

    def __init__(self, cfg: PerceiverConfig = PerceiverConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if cfg.self_blocks < 1 or not 1 <= cfg.cross_layers <= cfg.self_blocks:
            raise ConfigError(f"Perceiver: self_blocks={cfg.self_blocks}, cross_layers={cfg.cross_layers}; need "
                              "self_blocks >= 1 and 1 <= cross_layers <= self_blocks (model.connector."
                              "perceiver_blocks / perceiver_cross_layers)")
        self.cfg, self.dtype = cfg, dtype
        init = nnx.initializers.normal(cfg.init_scale)
        kw = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.latents = param(init(rngs.params(), (cfg.n_latents, cfg.d), param_dtype), ("queries", "conn_embed"))

        def cross():
            return _PerceiverCrossLayer(cfg.d, cfg.kv_dim, cfg.cross_heads, cfg.widening, cfg.dropout, **kw)

        def block():
            return nnx.List([_PerceiverSelfLayer(cfg.d, cfg.self_heads, cfg.widening, cfg.dropout, **kw)
                             for _ in range(cfg.self_layers_per_block)])

        self.cross = cross()
        self.block = block()
        self.cross_n = cross() if cfg.cross_layers > 1 and not cfg.shared_cross else None
        self.block_n = block() if cfg.self_blocks > 1 and not cfg.shared_blocks else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b = x.shape[0]
        lat = jnp.broadcast_to(self.latents[...].astype(self.dtype)[None], (b, *self.latents.shape))
        for i in range(self.cfg.self_blocks):
            if i < self.cfg.cross_layers:
                cross = self.cross if i == 0 or self.cross_n is None else self.cross_n
                lat = cross(lat, x, mask)
            for layer in (self.block if i == 0 or self.block_n is None else self.block_n):
                lat = layer(lat)
        return lat


@dataclasses.dataclass(frozen=True)
class PerceiverFusionConfig:
    """ALARM-P: one Perceiver per conditional encoder (W2V-BERT 1024, MuQ 1024, SSLAM 768 wide inputs)."""

    llm_dim: int = 2560
    cond_dims: tuple[int, ...] = (1024, 1024, 768)
    perceiver: PerceiverConfig = PerceiverConfig()
    boundary_init_std: float = 1.0   # torch.randn in ALARM


class PerceiverFusion(nnx.Module):
    """main `[batch, T, llm_dim]` (e.g. adapted Whisper), conds `[batch, S_i, cond_dims[i]]`, cond_masks
    `[batch, S_i]` (True = valid, optional) -> `[batch, 1 + n_cond * n_latents + 1 + T, llm_dim]` laid out
    `[cond_start, latents_1, ..., latents_n, cond_end, main]`: `n_latents * n_cond + 2` extra tokens."""

    def __init__(self, cfg: PerceiverFusionConfig = PerceiverFusionConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.perceivers = nnx.List([Perceiver(dataclasses.replace(cfg.perceiver, kv_dim=k), rngs=rngs, **kw)
                                    for k in cfg.cond_dims])
        self.out_proj = nnx.List([Linear(cfg.perceiver.d, cfg.llm_dim, axes=("conn_embed", "conn_embed"),
                                         use_bias=True, rngs=rngs, **kw) for _ in cfg.cond_dims])
        self.boundary = AudioBoundary(cfg.llm_dim, init_std=cfg.boundary_init_std, rngs=rngs, **kw)

    @property
    def n_extra_tokens(self) -> int:
        return self.cfg.perceiver.n_latents * len(self.cfg.cond_dims) + 2

    def __call__(self, main: jax.Array, conds: Sequence[jax.Array],
                 cond_masks: Sequence[jax.Array | None] | None = None) -> jax.Array:
        if len(conds) != len(self.perceivers):
            raise ConfigError(f"PerceiverFusion: built for {len(self.perceivers)} conditional encoders "
                              f"(cond_dims={self.cfg.cond_dims}), got {len(conds)} streams")
        cond_masks = list(cond_masks) if cond_masks is not None else [None] * len(conds)
        latents = [proj(p(c, m)) for p, proj, c, m in zip(self.perceivers, self.out_proj, conds, cond_masks)]
        prefix = self.boundary(jnp.concatenate(latents, axis=1))
        return jnp.concatenate([prefix, main.astype(self.dtype)], axis=1)

    def output_lengths(self, main_lengths):
        return main_lengths + self.n_extra_tokens
