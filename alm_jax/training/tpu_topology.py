"""TPU slice names (`v5p-64`, `v6e-16`, ...) -> the topology JAX's TPU compiler needs, and the chip's HBM.

    spec = tpu_slice("v5p-64")        # TpuSlice(generation="v5p", topology="2x4x4", chips=32, ...)
    devices = topology_devices(spec, num_slices=2)   # 64 abstract TPU devices (two slices), no TPU needed

The user-facing name counts TensorCores for v4/v5p (two per chip, fused into one "megacore" device) and
chips for v5e/v6e, as Cloud TPU does. A raw topology (`v5p:2x4x4`) is accepted too. Describing devices needs
`libtpu` (the optional extra `alm_jax[tpu]`, i.e. `pip install "jax[tpu]==<jax version>"`); nothing runs on
them: they are compile targets (`training/aot.py`).
"""

from __future__ import annotations

import dataclasses
import math
import os

from alm_jax.errors import ConfigError

# generation -> (topology name prefix, chip config, cores per chip counted in the slice name, HBM bytes per
# chip, dense bf16 peak FLOP/s per chip)
GENERATIONS = {
    "v4": ("v4", "megacore", 2, 32 * 2**30, 275e12),
    "v5p": ("v5p", "megacore", 2, 95 * 2**30, 459e12),
    "v5e": ("v5e", "default", 1, 16 * 2**30, 197e12),
    "v6e": ("v6e", "default", 1, 32 * 2**30, 918e12),
}
ALIASES = {"v5litepod": "v5e"}
# chips -> topology of the standard slice shapes (3-D torus for v4/v5p, 2-D for v5e/v6e)
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice: generation, topology ("2x4x4"), chips (= JAX devices), HBM and peak per chip."""
    name: str
    generation: str
    topology: str
    chips: int
    hbm_bytes: int
    peak_flops: float

    @property
    def topology_name(self) -> str:
        return f"{GENERATIONS[self.generation][0]}:{self.topology}"


def _known(gen: str) -> str:
    gen = ALIASES.get(gen, gen)
    if gen not in GENERATIONS:
        raise ConfigError(f"TPU generation {gen!r} is not known; use one of {sorted(GENERATIONS)} (e.g. v5p-64, "
                          "v6e-16, or a topology such as v5p:2x4x4)")
    return gen


def tpu_slice(name: str) -> TpuSlice:
    """`v5p-64` / `v6e-16` / `v5litepod-8` / `v5p:2x4x4` -> its `TpuSlice`; ConfigError naming the valid sizes."""
    name = name.strip()
    if ":" in name:
        gen, topo = name.split(":", 1)
        gen = _known(gen)
        try:
            chips = math.prod(int(x) for x in topo.split("x"))
        except ValueError:
            raise ConfigError(f"--topology {name!r}: the topology after ':' must look like 2x4x4") from None
    else:
        gen, _, count = name.rpartition("-")
        gen = _known(gen)
        if not count.isdigit():
            raise ConfigError(f"--topology {name!r}: expected <generation>-<size>, e.g. v5p-64 or v6e-16")
        per_chip = GENERATIONS[gen][2]
        chips = int(count) // per_chip
        shapes = SHAPES_3D if per_chip == 2 else SHAPES_2D
        if int(count) % per_chip or chips not in shapes:
            sizes = ", ".join(f"{gen}-{c * per_chip}" for c in sorted(shapes))
            raise ConfigError(f"--topology {name!r} is not a standard slice; use one of {sizes}, or give the "
                              f"topology itself ({gen}:2x4x4)")
        topo = shapes[chips]
    _, _, _, hbm, peak = GENERATIONS[gen]
    return TpuSlice(name=name, generation=gen, topology=topo, chips=chips, hbm_bytes=hbm, peak_flops=peak)


def topology_devices(spec: TpuSlice, *, num_slices: int = 1) -> list:
    """Abstract devices of `num_slices` such slices (each with `slice_index` when num_slices > 1), described
    by libtpu on this machine (no TPU needed); ConfigError naming the install command when libtpu is absent."""
    import jax
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")       # not on a Cloud TPU VM: do not ask the metadata server
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # a compile target only: no device lock needed
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")   # (unset, libtpu logs errors looking for them)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{spec.generation}-{spec.chips * GENERATIONS[spec.generation][2]}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(f"compiling for {spec.name} needs libtpu; install the TPU extra: pip install "
                          f"\"alm_jax[tpu]\" (or pip install \"jax[tpu]=={jax.__version__}\")") from None
    _, chip_config, _, _, _ = GENERATIONS[spec.generation]
    dims = [int(x) for x in spec.topology.split("x")] + [1]
    host_bounds = tuple(min(b, d) for b, d in zip((2, 2, 1), dims))   # 4 chips per host (fewer in a tiny slice)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                        chip_config_name=chip_config, chips_per_host_bounds=host_bounds,
                                        num_slices=num_slices)
    return list(desc.devices)
