"""Pieces shared by the connectors: multi-head attention, 1-D convolution, BatchNorm over channels,
softmax layer averaging, tap selection, dropout helpers.

All parameters carry logical axes from `alm_jax/sharding.py` (connector weights use the `conn_*`
names, which are replicated by default). Kernels are stored `[in, out]` (conv: `[kernel, in, out]`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.layers import Initializer, Linear, default_kernel_init, param

NEG_INF = -1e30  # added to masked attention logits (float32); exp() underflows to exactly 0


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as `torch.nn.GELU()` and BERT's "gelu"."""
    return jax.nn.gelu(x, approximate=False)


def make_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """An `nnx.Dropout` for `rate > 0`, else None (no RNG state in the model). `model.eval()` turns it off."""
    return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


def apply_dropout(drop: nnx.Dropout | None, x: jax.Array) -> jax.Array:
    return x if drop is None else drop(x)


def select_taps(hidden_states: Sequence[jax.Array] | jax.Array, taps: Sequence[int], what: str) -> list[jax.Array]:
    """Pick `hidden_states[i]` for i in `taps` from a list of `[batch, frames, dim]` arrays (HF
    `hidden_states` style) or a stacked `[n_layers, batch, frames, dim]` array."""
    n = len(hidden_states) if not hasattr(hidden_states, "ndim") else hidden_states.shape[0]
    bad = [t for t in taps if not -n <= t < n]
    if bad:
        raise ConfigError(f"{what}: layer indices {bad} are out of range for {n} encoder hidden states; "
                          f"set the tap indices to values in [0, {n})")
    return [hidden_states[t] for t in taps]


def check_last_dim(x: jax.Array, dim: int, what: str) -> None:
    if x.shape[-1] != dim:
        raise ConfigError(f"{what}: expected feature size {dim}, got an input of shape {tuple(x.shape)}; "
                          "set the config's input width to the encoder's hidden size")


class MultiHeadAttention(nnx.Module):
    """Scaled dot-product attention with separate q/k/v/out projections.

    q_in `[batch, q_len, q_dim]`, kv_in `[batch, kv_len, kv_dim]`, mask `[batch, kv_len]` (True = attend)
    -> `[batch, q_len, out_dim]`. q/k/v project to `hidden = heads * head_dim`; logits and softmax are
    float32; `dropout` applies to the attention probabilities (as in BERT and torch MHA).

    `fully_masked`: what a batch row whose mask marks no key at all gets, the references differing there.
    "uniform" (default): the softmax of equal -1e30 logits, i.e. the plain average of all kv_len values, padded
    ones included (BERT's additive mask, ALARM's Perceiver). "zero": a zero context, so the output is the out
    projection's bias: torch `nn.MultiheadAttention` -> `F.scaled_dot_product_attention`, whose softmax gives a
    row with no allowed key zero weights (ALARM-CA's `nn.TransformerDecoderLayer`; torch's eval-mode no-grad
    self-attention fast path gives NaN there instead, which nothing here copies).
    """

    def __init__(self, q_dim: int, kv_dim: int, hidden: int, heads: int, *, out_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
                 fully_masked: Literal["uniform", "zero"] = "uniform",
                 kernel_init: Initializer = default_kernel_init, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if hidden % heads:
            raise ConfigError(f"attention width {hidden} is not divisible by {heads} heads")
        if fully_masked not in ("uniform", "zero"):
            raise ConfigError(f"MultiHeadAttention: fully_masked={fully_masked!r}; use 'uniform' (average of all "
                              "values) or 'zero' (torch's zero context) for a row with every key masked")
        self.fully_masked = fully_masked
        self.heads, self.head_dim = heads, hidden // heads
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.query = Linear(q_dim, hidden, axes=("conn_embed", "conn_heads"), use_bias=qkv_bias, **kw)
        self.key = Linear(kv_dim, hidden, axes=("conn_embed", "conn_heads"), use_bias=qkv_bias, **kw)
        self.value = Linear(kv_dim, hidden, axes=("conn_embed", "conn_heads"), use_bias=qkv_bias, **kw)
        self.out = Linear(hidden, out_dim or q_dim, axes=("conn_heads", "conn_embed"), use_bias=out_bias, **kw)
        self.dropout = make_dropout(dropout, rngs)

    def __call__(self, q_in: jax.Array, kv_in: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, lq, _ = q_in.shape
        lk = kv_in.shape[1]
        q = self.query(q_in).reshape(b, lq, self.heads, self.head_dim)
        k = self.key(kv_in).reshape(b, lk, self.heads, self.head_dim)
        v = self.value(kv_in).reshape(b, lk, self.heads, self.head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        logits = logits * (self.head_dim ** -0.5)
        if mask is not None:
            mask = mask.astype(bool)
            logits = jnp.where(mask[:, None, None, :], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None and self.fully_masked == "zero":
            probs = jnp.where(mask.any(-1)[:, None, None, None], probs, 0.0)
        probs = apply_dropout(self.dropout, probs).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, self.heads * self.head_dim)
        return self.out(ctx)



class BatchNorm1d(nnx.Module):
    """BatchNorm over the channel (last) axis of `[batch, time, channels]`, torch `BatchNorm1d` semantics.

    Training (`use_running_average=False`): normalizes with the batch statistics over (batch, time) and
    updates the running averages (`nnx.BatchStat`): `running = (1 - momentum) * running + momentum *
    batch_stat`, the variance entering the running average being the unbiased one (as torch does).
    Eval (`use_running_average=True`, set by `model.eval()` or when the adapter is frozen): normalizes
    with the running statistics and changes nothing. Statistics are float32. Padded frames count in the
    batch statistics, as in the reference (ALARM).
    """

    def __init__(self, dim: int, *, momentum: float = 0.1, eps: float = 1e-5, use_running_average: bool = False,
                 axis_name: str = "conn_mlp", dtype=jnp.float32, param_dtype=jnp.float32):
        self.momentum, self.eps, self.dtype = momentum, eps, dtype
        self.use_running_average = use_running_average
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 use_running_average: bool | None = None) -> jax.Array:
        """x `[..., dim]`; in training, `mask` (x's shape without `dim`, e.g. `[batch, time]`) limits the batch
        statistics to the positions it marks (None: all)."""
        use_running = self.use_running_average if use_running_average is None else use_running_average
        xf = x.astype(jnp.float32)
        if use_running:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                mean = xf.mean(axes)
                var = jnp.square(xf - mean).mean(axes)
                n = 1
                for a in axes:
                    n *= x.shape[a]
                unbiased = var * (n / max(n - 1, 1))
            else:
                w = mask.astype(jnp.float32)[..., None]
                n = jnp.sum(w)
                mean = jnp.sum(xf * w, axes) / jnp.maximum(n, 1.0)
                var = jnp.sum(jnp.square(xf - mean) * w, axes) / jnp.maximum(n, 1.0)
                unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerSoftmaxAverage(nnx.Module):
    """Softmax-weighted average of encoder layers; weights `[n_layers]` initialised to zeros (uniform).

    layers: list of `[batch, frames, dim]` -> `[batch, frames, dim]`. One layer: returned as is, no weights
    (as in ALARM)."""

    def __init__(self, n_layers: int, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.weights = param(jnp.zeros((n_layers,), param_dtype), ("taps",)) if n_layers > 1 else None

    def __call__(self, layers: Sequence[jax.Array]) -> jax.Array:
        if self.weights is None:
            return layers[0].astype(self.dtype)
        w = jax.nn.softmax(self.weights[...].astype(jnp.float32))
        stacked = jnp.stack([x.astype(jnp.float32) for x in layers], axis=0)
        return jnp.einsum("l,l...->...", w, stacked).astype(self.dtype)
