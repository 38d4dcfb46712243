"""The device mesh and the ONE table that maps logical axis names to mesh axes.

Model code only names logical axes (see `LOGICAL_AXES`); which mesh axis shards each of them is decided
here and nowhere else, so changing parallelism never touches model code.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding), `tensor`
(tensor/model parallel).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from alm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # LLM parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # audio encoder parameters
    ("audio_embed", "fsdp"),
    ("audio_mlp", "tensor"),
    ("audio_heads", "tensor"),
    ("audio_pos", None),
    ("mel", None),
    ("conv_kernel", None),
    # connector / adapter parameters (small, trainable: replicated by default)
    ("conn_embed", None),
    ("conn_mlp", None),
    ("conn_heads", None),
    ("queries", None),
    ("taps", None),
    # LoRA
    ("lora_rank", None),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes; one of the sizes may be -1 to fill the devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{name}={s}: sizes must be positive integers or -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices; "
            "make the product equal the device count or set one axis to -1")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_RULES) -> P:
    """Map logical axis names to a PartitionSpec. With `shape` and `mesh`, a dimension that the mesh
    axis does not divide is replicated instead (small or odd tensors), and a mesh axis is used once."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ConfigError(f"unknown logical axis {name!r}; known: {sorted(table)}")
        target = table[name]
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used and (mesh is None or t in mesh.shape))
        if mesh is not None and shape is not None and targets:
            size = math.prod(mesh.shape[t] for t in targets)
            if shape[i] % size:
                targets = ()
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return P(*out)


def _axes_of(var) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for every leaf of an nnx state (abstract or concrete), from its logical axes."""
    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = _axes_of(var)
        shape = getattr(value, "shape", ())
        if axes is not None and len(axes) != len(shape):
            raise ConfigError(f"parameter of shape {shape} has {len(axes)} logical axes {axes}")
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: the batch axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def mesh_from_config(cfg) -> Mesh:
    """The run's mesh from a `MeshConfig`: `mesh.data` (times `mesh.dcn_data`), `mesh.fsdp`, `mesh.tensor`."""
    data = cfg.data * cfg.dcn_data if cfg.data != -1 else -1
    return make_mesh(data, cfg.fsdp, cfg.tensor)


def host_scalars(tree: dict) -> dict[str, float]:
    """Replicated scalar outputs -> Python floats (reads this process's copy: works multi-process)."""
    return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)) for k, v in tree.items()}


def place_on_mesh(tree, mesh: Mesh):
    """Leaves not yet laid out on `mesh` (e.g. the optimizer's step counters, which `tx.init` creates
    on one device) become replicated on it, so a jitted step sees the same input shardings at every call
    (otherwise its second call compiles again). Works multi-process: built from each process's copy."""
    rep = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])
    return jax.tree.map(one, tree)
