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

Scanned layer stacks (`models/stack.py`): a Linear inside one has a stacked kernel `[L, in, out]`; its
wrapper gets stacked factors A `[L, in, rank]`, B `[L, rank, out]` (leading logical axis "layers"). The regex
is matched against the per-layer paths (`layers/3/self_attn/q_proj`), as for an unrolled stack; when it picks
only some layers of a stacked Linear, a frozen `LoRALayerMask` `[L]` (1 = picked) zeroes the others' update
(their factors exist but never act, get zero gradients and are not exported). `lora_per_layer` lists the
adapters layer by layer, with per-layer paths, for the exports.

Dropout (PEFT's `lora_dropout`, on the branch's input only): each adapted layer draws its masks from its own
stream, keyed by `fold_in(base, crc32(per-layer path))` with `base` one draw from the `dropout` stream of the
`rngs` given to `apply_lora`, and counted by an `nnx.RngCount` that advances once per call. A stacked
wrapper holds its layers' keys and counts stacked `[L]`, so the scanned stack hands each layer its slice
and writes the advanced counts back (`stack.run_stack`); an unrolled stack's wrappers hold the same keys one
each. Scanned and unrolled therefore draw the same masks, and a checkpoint of the counts
(`models.alm.RUNNING_STATE`) resumes the sequence exactly. `model.eval()` turns dropout off.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.layers import Linear
from alm_jax.models.stack import LAYER_AXIS, layer_paths, stacks

LORA_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # = kaiming_uniform(a=sqrt(5))


def _kernel_axes(kernel: nnx.Variable) -> tuple:
    meta = kernel.get_metadata()
    axes = meta.get("out_sharding") or meta.get("sharding_names") or (None,) * kernel.ndim
    return tuple(axes)


class LoRALayerMask(nnx.Variable):
    """Which layers of a stacked LoRA wrapper act: `[L]` float32, 1 = adapted, 0 = not (frozen, never trained)."""


def dropout_key(base: jax.Array, path: str) -> jax.Array:
    """The dropout key of the adapted layer at per-layer module path `path` ("layers/3/self_attn/q_proj")."""
    return jax.random.fold_in(base, zlib.crc32(path.encode()) & 0x7FFFFFFF)


class LoRALinear(nnx.Module):
    """A `Linear` plus a low-rank update. x `[..., in]` -> `[..., out]` in the base's dtype.

    On a stacked base (kernel `[L, in, out]`, inside a scanned stack) the factors are stacked too and
    `layers` (L bools) says which layers are adapted (None: all). `dropout_keys`: the dropout stream's key
    (`[L]` keys on a stacked base); None draws it from `rngs`."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float = 0.0, rngs: nnx.Rngs,
                 layers: tuple[bool, ...] | None = None, dropout_keys: jax.Array | None = None):
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        *lead_axes, in_axis, out_axis = _kernel_axes(base.kernel)
        *lead, in_features, out_features = base.kernel.shape
        if lead:   # one factor pair per layer of a stacked kernel, each drawn like an unstacked one
            keys = jax.random.split(rngs.params(), lead[0])
            a = jax.vmap(lambda k: LORA_A_INIT(k, (in_features, rank), jnp.float32))(keys)
        else:
            a = LORA_A_INIT(rngs.params(), (in_features, rank), jnp.float32)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(*lead_axes, in_axis, "lora_rank"), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, out_features), jnp.float32),
                                    out_sharding=(*lead_axes, "lora_rank", out_axis), eager_sharding=False)
        partial = layers is not None and not all(layers)
        self.layer_mask = (LoRALayerMask(jnp.asarray(layers, jnp.float32), out_sharding=(LAYER_AXIS,),
                                         eager_sharding=False) if partial else None)
        drop = None
        if dropout > 0:
            if dropout_keys is None:
                dropout_keys = rngs["dropout"]()
                dropout_keys = jax.random.split(dropout_keys, lead[0]) if lead else dropout_keys
            drop = nnx.Dropout(dropout)
            drop.rngs = nnx.RngStream(dropout_keys, tag="dropout")   # key and count [L] when stacked
        self.dropout = drop
        self.merged = False

    @property
    def stacked(self) -> bool:
        return self.lora_a.ndim == 3

    def delta(self, layer: int | None = None) -> jax.Array:
        """The kernel update A @ B * scale, float32: `[in, out]` (unstacked, or layer `layer` of a stacked
        wrapper) or `[L, in, out]` (a stacked wrapper, every layer; not-adapted layers are zero)."""
        a, b = self.lora_a[...], self.lora_b[...]
        scale = jnp.asarray(self.scale, jnp.float32)
        if self.layer_mask is not None:
            scale = scale * self.layer_mask[...]
        if layer is not None:
            a, b, scale = a[layer], b[layer], scale[layer] if scale.ndim else scale
        elif scale.ndim:
            scale = scale[:, None, None]
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """Inside a scanned stack this sees one layer's slice: A `[in, rank]`, B `[rank, out]`, mask `[]`."""
        y = self.base(x)
        if self.merged:
            return y
        dt = self.base.dtype
        h = x if self.dropout is None else self.dropout(x)
        low = jnp.dot(h.astype(dt), self.lora_a[...].astype(dt))
        scale = jnp.asarray(self.scale, dt)
        if self.layer_mask is not None:
            scale = scale * self.layer_mask[...].astype(dt)
        return y + jnp.dot(low, self.lora_b[...].astype(dt)) * scale


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
    `LoRALinear` are skipped. A regex that matches no Linear raises `ConfigError` naming it. With `dropout`
    > 0, one key is drawn from `rngs`' dropout stream and each adapted layer's stream is derived from it and
    its per-layer path (see the module doc), the same for a scanned and an unrolled stack."""
    try:
        pattern = re.compile(target_regex)
    except re.error as e:
        raise ConfigError(f"LoRA target_regex {target_regex!r} is not a valid regex: {e}") from e
    found = stacks(model)
    candidates = _linear_paths(model)
    hits, wrapped = [], []
    for path, lin in candidates:
        if isinstance(_parent(model, path), LoRALinear):
            continue
        picked = tuple(bool(pattern.search(_path_str(p))) for p in layer_paths(path, found))
        if any(picked):
            hits.append((path, lin, picked))
            wrapped += [p for p, on in zip(layer_paths(path, found), picked) if on]
    if not hits:
        names = [_path_str(p) for path, _ in candidates for p in layer_paths(path, found)]
        raise ConfigError(f"LoRA target_regex {target_regex!r} matches no Linear layer; "
                          f"{len(names)} Linear paths exist, e.g. {names[:8]}")
    base_key = rngs["dropout"]() if dropout > 0 else None   # before any factor is drawn: one draw either way
    for path, lin, picked in hits:
        stacked = lin.kernel.ndim == 3
        keys = None
        if base_key is not None:
            keys = jnp.stack([dropout_key(base_key, _path_str(p)) for p in layer_paths(path, found)])
            keys = keys if stacked else keys[0]
        wrapper = LoRALinear(lin, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs,
                             layers=picked if stacked else None, dropout_keys=keys)
        parent, key = _parent(model, path), path[-1]
        if isinstance(key, int):
            parent[key] = wrapper
        else:
            setattr(parent, key, wrapper)
    return sorted(_path_str(p) for p in wrapped)


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(path, LoRALinear) for every wrapper in the model (a stacked wrapper once, at its stacked path)."""
    return [(_path_str(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)]


@dataclasses.dataclass(frozen=True)
class LayerLoRA:
    """One adapted Linear of one layer: its per-layer module path ("layers/3/self_attn/q_proj"), the wrapper,
    and the layer index into a stacked wrapper's factors (None: unstacked)."""
    path: str
    wrapper: LoRALinear
    layer: int | None

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """(A `[in, rank]`, B `[rank, out]`) of this layer."""
        a, b = self.wrapper.lora_a[...], self.wrapper.lora_b[...]
        return (a, b) if self.layer is None else (a[self.layer], b[self.layer])


def lora_per_layer(model: nnx.Module) -> list[LayerLoRA]:
    """Every adapted (Linear, layer) of the model, stacked wrappers unstacked and their not-adapted layers
    left out, sorted by path."""
    found = stacks(model)
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, LoRALinear):
            continue
        if not node.stacked:
            out.append(LayerLoRA(_path_str(path), node, None))
            continue
        mask = np.ones(node.lora_a.shape[0]) if node.layer_mask is None else np.asarray(node.layer_mask[...])
        out += [LayerLoRA(_path_str(p), node, i) for i, p in enumerate(layer_paths(tuple(path), found)) if mask[i]]
    return sorted(out, key=lambda x: x.path)


def linear_module_paths(model: nnx.Module) -> list[str]:
    """The per-layer path of every Linear (a wrapped one by its wrapper's path), sorted."""
    found = stacks(model)
    out = set()
    for path, _ in _linear_paths(model):
        if isinstance(_parent(model, path), LoRALinear):
            path = path[:-1]
        out.update(_path_str(p) for p in layer_paths(path, found))
    return sorted(out)


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
