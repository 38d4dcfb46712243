"""LoRA on chosen `alm_jax.models.layers.Linear` layers.

`apply_lora` wraps every Linear whose module path matches a regex in a `LoRALinear`:
y = base(x) + dropout(x) @ A @ B * (alpha / rank), A `[in, rank]` (PEFT's default init: uniform with
variance 1/(3 in)), B `[rank, out]` zeros, both `nnx.LoRAParam` (float32) with logical axes
`(in_axis, "lora_rank")` / `("lora_rank", out_axis)` taken from the base kernel. Train with
`wrt=nnx.LoRAParam`; the base kernel stays an ordinary (frozen) `nnx.Param`.

`merge_lora` adds A @ B * scale into each base kernel and marks the wrapper merged (its LoRA branch is then
skipped); A and B are kept so that `unmerge_lora` can subtract the same product again. Merging is exact up
to the kernel dtype's rounding: merge/unmerge a bfloat16 kernel and it comes back within bf16 rounding,
not bit-exact. The merged flag is a Python attribute (static), not state: save checkpoints unmerged.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.layers import Linear

LORA_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # = kaiming_uniform(a=sqrt(5))


def _kernel_axes(kernel: nnx.Variable) -> tuple:
    meta = kernel.get_metadata()
    axes = meta.get("out_sharding") or meta.get("sharding_names") or (None, None)
    return tuple(axes)


class LoRALinear(nnx.Module):
    """A `Linear` plus a low-rank update. x `[..., in]` -> `[..., out]` in the base's dtype."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float = 0.0, rngs: nnx.Rngs):
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        in_axis, out_axis = _kernel_axes(base.kernel)
        self.lora_a = nnx.LoRAParam(LORA_A_INIT(rngs.params(), (base.in_features, rank), jnp.float32),
                                    out_sharding=(in_axis, "lora_rank"), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), jnp.float32),
                                    out_sharding=("lora_rank", out_axis), eager_sharding=False)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.merged = False

    def delta(self) -> jax.Array:
        """The kernel update A @ B * scale `[in, out]`, float32."""
        return jnp.dot(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST) * self.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.merged:
            return y
        dt = self.base.dtype
        h = x if self.dropout is None else self.dropout(x)
        low = jnp.dot(h.astype(dt), self.lora_a[...].astype(dt))
        return y + jnp.dot(low, self.lora_b[...].astype(dt)) * jnp.asarray(self.scale, dt)


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _linear_paths(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and not any(str(p).startswith("_pytree") for p in path):
            out.append((tuple(path), node))
    return out


def _parent(model, path):
    node = model
    for p in path[:-1]:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0, target_regex: str,
               rngs: nnx.Rngs) -> list[str]:
    """Wrap, in place, every `Linear` whose path (e.g. "layers/3/attn/q_proj") matches `target_regex`
    (`re.search`) in a `LoRALinear`. Returns the wrapped paths, sorted. Linears already inside a
    `LoRALinear` are skipped. A regex that matches no Linear raises `ConfigError` naming it."""
    try:
        pattern = re.compile(target_regex)
    except re.error as e:
        raise ConfigError(f"LoRA target_regex {target_regex!r} is not a valid regex: {e}") from e
    candidates = _linear_paths(model)
    hits = []
    for path, lin in candidates:
        if isinstance(_parent(model, path), LoRALinear):
            continue
        if pattern.search(_path_str(path)):
            hits.append((path, lin))
    if not hits:
        names = [_path_str(p) for p, _ in candidates]
        raise ConfigError(f"LoRA target_regex {target_regex!r} matches no Linear layer; "
                          f"{len(names)} Linear paths exist, e.g. {names[:8]}")
    for path, lin in hits:
        wrapper = LoRALinear(lin, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
        parent, key = _parent(model, path), path[-1]
        if isinstance(key, int):
            parent[key] = wrapper
        else:
            setattr(parent, key, wrapper)
    return sorted(_path_str(p) for p, _ in hits)


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(path, LoRALinear) for every wrapper in the model."""
    return [(_path_str(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]


def merge_lora(model: nnx.Module) -> int:
    """Fold A @ B * scale into every unmerged wrapper's base kernel (in place); returns how many."""
    n = 0
    for _, layer in lora_layers(model):
        if not layer.merged:
            k = layer.base.kernel
            k.set_value((k[...].astype(jnp.float32) + layer.delta()).astype(k.dtype))
            layer.merged = True
            n += 1
    return n


def unmerge_lora(model: nnx.Module) -> int:
    """Undo `merge_lora`: subtract A @ B * scale from every merged wrapper's base kernel; returns how many."""
    n = 0
    for _, layer in lora_layers(model):
        if layer.merged:
            k = layer.base.kernel
            k.set_value((k[...].astype(jnp.float32) - layer.delta()).astype(k.dtype))
            layer.merged = False
            n += 1
    return n
