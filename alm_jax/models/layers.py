"""Building blocks shared by every model: parameters with logical axes, Linear, norms, embeddings, and the
decoder pieces (rotary embeddings, masks, grouped-query attention, KV cache, SwiGLU MLP).

Every parameter is created with `param(...)`, which records its logical axis names (mapped to mesh axes
only in `alm_jax/sharding.py`). Kernels are stored `[in, out]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (one per dimension), not eagerly sharded."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"param of shape {value.shape} got {len(axes)} logical axes {axes}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel `[in_features, out_features]`, axes `(in_axis, out_axis)`."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., in]` -> `[..., out]` in `dtype`."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32."""

    def __init__(self, dim: int, *, axis_name: str | None = "norm", eps: float = 1e-5, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., dim]` -> same shape, in `dtype`."""
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (Llama/Qwen): x / rms(x) * scale, statistics in float32."""

    def __init__(self, dim: int, *, axis_name: str | None = "norm", eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., dim]` -> same shape, in `dtype`."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table `[vocab, dim]`; `attend` gives tied-output logits."""

    def __init__(self, vocab: int, dim: int, *, axes: tuple[str, str] = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.normal(stddev=0.02)
        self.embedding = param(init(rngs.params(), (vocab, dim), param_dtype), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids `[...]` int -> `[..., dim]`."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x `[..., dim]` -> logits `[..., vocab]` (tied head)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


# --------------------------------------------------------------------------------------------------------------
# Decoder building blocks: rotary embeddings, attention masks, grouped-query attention, KV cache, SwiGLU MLP.

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", *, factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_positions: int = 8192) -> np.ndarray:
    """Rotary inverse frequencies `[head_dim // 2]` float32.

    'default': theta^(-2i/head_dim). 'linear': divided by `factor` (position interpolation). 'llama3'
    (Llama 3.1): wavelengths longer than original_max_positions / low_freq_factor are slowed by `factor`,
    those shorter than original_max_positions / high_freq_factor are kept, and the band between is blended.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        wavelen = 2 * np.pi / inv_freq
        smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > original_max_positions / low_freq_factor, inv_freq / factor,
                            np.where(wavelen < original_max_positions / high_freq_factor, inv_freq, blended))
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
    """Rotates x `[batch, time, heads, head_dim]` by positions `[batch, time]` (HF half-split layout:
    dimension i pairs with i + head_dim/2). Angles in float32; returns x's dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    first, second = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions `[batch, time]` int32 of a padding mask `[batch, time]` (1 = token): the count of tokens
    before each one, so a left-padded row has the positions of the unpadded row; padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions `[batch, time]` int32 that restart at 0 wherever segment_ids `[batch, time]` changes."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def causal_mask(mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Attention mask `[batch, query, key]` bool for one sequence: causal, keys restricted to real tokens
    of mask `[batch, time]`, and (with segment_ids `[batch, time]`) to the query's own segment."""
    t = mask.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with K kv heads shared by groups of H/K query heads (query head h reads kv
    head h // (H/K), as in HF). q `[b, t, H, d]`, k/v `[b, s, K, d]`, mask `[b, t, s]` bool -> `[b, t, H, d]`.
    Scores and softmax in float32; a fully masked query row gets a uniform (finite) distribution."""
    b, t, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    q = q.reshape(b, t, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, num_heads, head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A functional KV cache (a pytree: pass it into a jitted call and take the returned one).

    keys/values: every layer's, stacked `[layers, batch, max_len, kv_heads, head_dim]` (a scanned layer stack
    carries them through its scan; an unrolled one indexes them); valid `[batch, max_len]` bool (the slot
    holds a real token, so left padding stays masked); end: int32 scalar, the next slot to write (shared by
    the batch); next_position `[batch]` int32, the rotary position of each row's next real token.
    Writing past max_len is not checked (size it to prompt + new tokens).
    """
    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    end: jax.Array
    next_position: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))

    def append_tokens(self, mask: jax.Array) -> tuple[jax.Array, jax.Array, "KVCache"]:
        """For new tokens with padding mask `[batch, time]` at slots end..end+time: returns their default
        positions `[batch, time]`, the attention mask `[batch, time, max_len]` over the cache slots, and the
        cache with valid/end/next_position advanced (keys/values are written by each layer)."""
        mask = mask.astype(bool)
        t, max_len = mask.shape[1], self.valid.shape[1]
        positions = self.next_position[:, None] + positions_from_mask(mask)
        valid = jax.lax.dynamic_update_slice(self.valid, mask, (0, self.end))
        slot_of_query = self.end + jnp.arange(t)
        allowed = (jnp.arange(max_len)[None, :] <= slot_of_query[:, None])[None] & valid[:, None, :]
        advanced = dataclasses.replace(self, valid=valid, end=self.end + t,
                                       next_position=self.next_position + mask.sum(1, dtype=jnp.int32))
        return positions, allowed, advanced


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional per-head q/k RMSNorm (Qwen3) and biases (Qwen2).

    Kernels are 2-D `[in, out]` like every Linear: q `[embed, heads*head_dim]` ('embed', 'heads'), k/v
    `[embed, kv_heads*head_dim]` ('embed', 'kv_heads'), o `[heads*head_dim, embed]` ('heads', 'embed'); the
    fused heads*head_dim axis is what 'heads'/'kv_heads' shard. q/k norms `[head_dim]` ('norm',).
    """

    def __init__(self, embed: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(embed, num_heads * head_dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k_proj = Linear(embed, num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
        self.v_proj = Linear(embed, num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
        self.o_proj = Linear(num_heads * head_dim, embed, axes=("heads", "embed"), use_bias=out_bias, **kw)
        norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None

    def __call__(self, x: jax.Array, *, positions: jax.Array, inv_freq, mask: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, layer: jax.Array | int = 0,
                 write_at: jax.Array | None = None):
        """x `[b, t, embed]`, positions `[b, t]`, mask `[b, t, s]` bool over the keys: the t new tokens
        (s = t) or, with kv_cache (keys, values) `[layers, b, s, kv_heads, head_dim]` (every layer's cache),
        every slot of entry `layer` after this call's keys/values are written there at slot `write_at` (only
        the t new slots are written: the stacked cache is updated in place). Returns (`[b, t, embed]`,
        (k, v)): the updated stacked cache, or this call's keys/values `[b, t, kv_heads, head_dim]`."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv_cache is not None:
            start = (layer, 0, write_at, 0, 0)
            keys = jax.lax.dynamic_update_slice(kv_cache[0], k[None].astype(kv_cache[0].dtype), start)
            values = jax.lax.dynamic_update_slice(kv_cache[1], v[None].astype(kv_cache[1].dtype), start)
            k = jax.lax.dynamic_index_in_dim(keys, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(values, layer, 0, keepdims=False)
        out = grouped_query_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return out, ((keys, values) if kv_cache is not None else (k, v))


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); gate/up `[embed, mlp]` ('embed', 'mlp'), down `[mlp, embed]`."""

    def __init__(self, embed: int, hidden: int, *, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(embed, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(embed, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, embed, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., embed]` -> `[..., embed]`."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Conv1d(nnx.Module):
    """1-D convolution over time, channels last, zero padding. kernel `[kernel, in, out]` with logical axes
    `("conv_kernel", *axes)` (torch's `[out, in, kernel]` transposed by (2, 1, 0)), bias `[out]`."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, use_bias: bool = True, axes: tuple[str | None, str | None],
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride, self.padding, self.dtype = stride, padding, dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = param(init(rngs.params(), (kernel_size, in_features, out_features), param_dtype),
                            ("conv_kernel", *axes))
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[batch, time, in]` -> `[batch, time', out]`, time' = (time + 2 padding - kernel) // stride + 1."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride,),
            padding=[(self.padding, self.padding)], dimension_numbers=("NWC", "WIO", "NWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
