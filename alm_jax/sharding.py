"""The device mesh and the ONE table that maps logical axis names to mesh axes.

Model code only names logical axes (see `LOGICAL_AXES`); which mesh axis shards each of them is decided
here and nowhere else, so changing parallelism never touches model code.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding), `tensor`
(tensor/model parallel).

Multi-slice (hybrid) meshes: `mesh.data`, `mesh.fsdp`, `mesh.tensor` describe ONE slice (devices joined by
the fast intra-slice network: TPU ICI, or NVLink inside a GPU node) and `mesh.dcn_data` is the number of
slices (joined by the data-center network, DCN), which only replicate data. The mesh keeps the three axis
names, so the rule table below is unchanged: its `data` axis has `dcn_data * data` entries, slice-major
(entry `s * data + i` is position `i` of slice `s`), so neighbours along `data` inside a slice talk over
ICI and only the gradient all-reduce crosses DCN. Slices are the devices' `slice_index` (Cloud TPU
multi-slice, via `jax.experimental.mesh_utils.create_hybrid_device_mesh`); devices without one (CPU, most
GPU clusters) are cut into `dcn_data` contiguous groups of `jax.devices()`, which is process-major, so a
slice is a set of whole processes (hosts) when `dcn_data` divides the process count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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
    # the leading axis of a scanned layer stack's parameters (`models/stack.py`): every device holds all layers
    ("layers", None),
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
ACTIVATION_AXES = ("batch", "length", "act_embed")   # a hidden-state tensor [batch, time, d]


def _fill_sizes(sizes: list[int], n: int, what: str) -> list[int]:
    """(data, fsdp, tensor) with a -1 filled so that their product is `n`; ConfigError naming the numbers."""
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{name}={s}: sizes must be positive integers or -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"mesh: {what} are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = n // known
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, dcn_data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes; one of the sizes may be -1 to fill the devices.

    With `dcn_data` > 1 the sizes are per slice and the mesh is hybrid (see the module docstring): its
    `data` axis is `dcn_data * data`, slice-major."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if not isinstance(dcn_data, int) or dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data={dcn_data}: the number of slices must be a positive integer")
    if dcn_data == 1:
        sizes = _fill_sizes([data, fsdp, tensor], n, f"{n} devices")
        if math.prod(sizes) != n:
            raise ConfigError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices; "
                "make the product equal the device count or set one axis to -1")
        arr = np.asarray(devices).reshape(sizes)
    else:
        if n % dcn_data:
            raise ConfigError(f"mesh.dcn_data={dcn_data} slices do not divide the {n} devices; set mesh.dcn_data "
                              "to the number of slices (or hosts groups)")
        per_slice = n // dcn_data
        sizes = _fill_sizes([data, fsdp, tensor], per_slice,
                            f"the {per_slice} devices per slice ({n} devices / mesh.dcn_data={dcn_data})")
        if math.prod(sizes) != per_slice:
            d, f, t = sizes
            raise ConfigError(
                f"mesh: dcn_data*data*fsdp*tensor = {dcn_data}*{d}*{f}*{t} = {dcn_data * d * f * t} but there are "
                f"{n} devices ({per_slice} per slice for mesh.dcn_data={dcn_data}); make data*fsdp*tensor equal "
                f"{per_slice} or set one axis to -1")
        arr = hybrid_device_array(sizes, dcn_data, devices)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _slices(devices: Sequence[Any]) -> list[list[Any]] | None:
    """The devices grouped by `slice_index` (sorted by it), or None when they have none or share one."""
    if not all(hasattr(d, "slice_index") for d in devices):
        return None
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(d.slice_index, []).append(d)
    return [groups[k] for k in sorted(groups)] if len(groups) > 1 else None


def _process_contiguous(arr: np.ndarray) -> bool:
    """Whether every process's devices hold one contiguous run of batch rows (the (data, fsdp) positions),
    as `alm_jax.data.multihost.process_rows` needs."""
    rows = arr.reshape(arr.shape[0] * arr.shape[1], -1)
    where: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        for p in {d.process_index for d in row}:
            where.setdefault(p, []).append(r)
    return all(r[-1] - r[0] + 1 == len(r) for r in where.values())


def hybrid_device_array(ici_shape: Sequence[int], dcn_data: int, devices: Sequence[Any]) -> np.ndarray:
    """Devices as a `(dcn_data * data, fsdp, tensor)` array for a hybrid mesh: slice `s` fills data rows
    `[s * data, (s + 1) * data)`, laid out as `ici_shape = (data, fsdp, tensor)` inside.

    Devices with several `slice_index` values (Cloud TPU multi-slice) go through
    `mesh_utils.create_hybrid_device_mesh` (topology-aware inside each slice); if that order would give a
    process non-contiguous batch rows, each slice is laid out in (process, device id) order instead.
    Devices without slices (CPU, GPU) are cut into `dcn_data` contiguous groups in the given order
    (MaxText's CPU/GPU fallback is the same idea: `process_is_granule`)."""
    ici_shape = tuple(int(s) for s in ici_shape)
    per_slice = math.prod(ici_shape)
    devices = list(devices)
    groups = _slices(devices)
    if groups is not None:
        if len(groups) != dcn_data:
            raise ConfigError(f"mesh.dcn_data={dcn_data} but the {len(devices)} devices belong to {len(groups)} "
                              f"slices (their slice_index); set mesh.dcn_data={len(groups)}")
        sizes = sorted({len(g) for g in groups})
        if sizes != [per_slice]:
            raise ConfigError(f"mesh: each slice must have data*fsdp*tensor = {per_slice} devices "
                              f"({dict(zip(MESH_AXES, ici_shape))}), but the slices have {sizes} devices")
        try:
            arr = mesh_utils.create_hybrid_device_mesh(ici_shape, (dcn_data, 1, 1), devices)
        except (ValueError, NotImplementedError, AssertionError):   # no topology-aware layout for this shape
            arr = None
        if arr is not None and _process_contiguous(arr):
            return arr
        groups = [sorted(g, key=lambda d: (d.process_index, d.id)) for g in groups]
    else:
        if len(devices) != dcn_data * per_slice:
            raise ConfigError(f"mesh: dcn_data*data*fsdp*tensor = {dcn_data}*{per_slice} = {dcn_data * per_slice} "
                              f"but there are {len(devices)} devices")
        groups = [devices[s * per_slice:(s + 1) * per_slice] for s in range(dcn_data)]
    return np.concatenate([np.asarray(g, dtype=object).reshape(ici_shape) for g in groups], axis=0)


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
    """The run's mesh from a `MeshConfig`: `mesh.data`, `mesh.fsdp`, `mesh.tensor` per slice, times
    `mesh.dcn_data` slices along `data` (a hybrid ICI x DCN mesh when it is > 1)."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, dcn_data=cfg.dcn_data)


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


def constrain(x, axes: Sequence[str | None]):
    """`x` constrained to the sharding its logical `axes` map to under the ambient mesh (`jax.set_mesh`, which
    the trainer and `alm compile` set around the train step); `x` unchanged when no mesh is set. Layer stacks
    need it on their scan carries: XLA fixes a loop carry's sharding from its initial value, so a carry born
    replicated (broadcast queries, a zeros buffer) would run the whole stack replicated over the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
