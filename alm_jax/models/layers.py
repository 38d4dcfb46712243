"""Building blocks shared by every model: parameters with logical axes, Linear, norms, embeddings.

Every parameter is created with `param(...)`, which records its logical axis names (mapped to mesh axes
only in `alm_jax/training/mesh.py`). Kernels are stored `[in, out]`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
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
