"""Ahead-of-time compilation of a run's train step for a TPU slice, from any machine (`alm compile`).

    report = compile_train_step(cfg, "v5p-64")      # lowers + compiles for 32 abstract v5p chips
    print(format_report(report))

The same step `alm train` runs (`training/step.py::build_train_step`, the config's optimizer, grad
accumulation and mesh) is lowered with abstract arguments: the model built as shapes only
(`weights/alm_params.py::abstract_alm`; architectures from config.json or the published table), the
trainable state + AdamW moments and the frozen weights laid out by the logical-axis rules
(`sharding.py`), the global batch of `data.batch_size` rows of `data.max_text_tokens` tokens with audio
as the pipeline builds it. It is then compiled by libtpu for the slice's devices (`training/tpu_topology.py`),
as MaxText's `train_compile` does, and XLA's per-device memory analysis and cost analysis are reported:
arguments (the sharded state, frozen weights and batch), outputs, temporaries (activations, gradients,
collective buffers), the donated bytes reused for outputs, and their total against the chip's HBM. A run
that does not fit raises `ConfigError` naming the numbers and the knobs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from alm_jax.audio.features import num_frames
from alm_jax.config import TrainConfig
from alm_jax.data.pipeline import AudioSpec
from alm_jax.errors import ConfigError
from alm_jax.models.alm import split_trainable
from alm_jax.sharding import batch_sharding, make_mesh, state_shardings
from alm_jax.training.flops import one_sample, step_flops
from alm_jax.training.staged import apply_freeze, split_fixed
from alm_jax.training.step import (TrainState, alm_loss, build_train_step, make_optimizer, make_schedule,
                                  split_model_state)
from alm_jax.training.tpu_topology import TpuSlice, topology_devices, tpu_slice
from alm_jax.weights.alm_params import abstract_alm

GiB = 2**30
FIT_KNOBS = ("lower data.batch_size or raise optim.grad_accum, shard more (mesh.fsdp, mesh.tensor), use "
             "model.remat=full, or a larger slice")


@dataclasses.dataclass
class CompileReport:
    """What the compiler says about one device of the slice running the train step (bytes, FLOPs)."""
    topology: str
    devices: int
    mesh: dict[str, int]
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int                 # donated argument bytes reused for outputs (counted once)
    code_bytes: int
    params: dict[str, int]           # parameter counts: trainable, frozen
    model_flops_per_step: int        # trainable-aware model FLOPs of the global step (training/flops.py)
    compiled_flops_per_device: float | None   # XLA's cost analysis of the partitioned program (a scanned layer
                                              # stack's loop body is counted once, not once per layer)
    peak_flops_per_device: float
    lower_seconds: float
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Peak per-device footprint as XLA plans it: arguments + outputs + temporaries - aliased."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def step_seconds_at(self, mfu: float) -> float:
        """Step time at a model-FLOPs utilisation `mfu` over the whole slice."""
        return self.model_flops_per_step / (self.devices * self.peak_flops_per_device * mfu)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits,
                "step_seconds_at_40pct_mfu": self.step_seconds_at(0.4)}


def abstract_batch(cfg: TrainConfig, encoder_mel_bins: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `alm train` feeds the step, as shapes with the batch sharding (see
    `data/pipeline.py`): text arrays `[B, T]`, audio `[B * C, S]` float32 (or host log-mel
    `[B * C, n_mels, frames]`) and `audio_samples` `[B * C]`."""
    d = cfg.data
    B, T, C = d.batch_size, d.max_text_tokens, d.max_clips
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))  # noqa
    batch = {k: spec((B, T), jnp.int32) for k in ("input_ids", "targets", "attention_mask", "audio_clip", "audio_pos")}
    batch["loss_mask"] = spec((B, T), jnp.float32)
    if d.host_features:
        frames = num_frames(0, pad_to_seconds=cfg.model.encoders[0].pad_to_seconds or d.max_audio_seconds)
        batch["audio_features"] = spec((B * C, encoder_mel_bins, frames), jnp.float32)
    else:
        batch["audio"] = spec((B * C, AudioSpec.from_config(cfg).buffer_samples), jnp.float32)
    batch["audio_samples"] = spec((B * C,), jnp.int32)
    return batch


def _with_shardings(tree, mesh):
    """nnx state (abstract) -> the same tree of ShapeDtypeStructs carrying the rule table's shardings."""
    shardings = state_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _mesh_for(cfg: TrainConfig, devices: list):
    m = cfg.mesh
    try:
        return make_mesh(m.data, m.fsdp, m.tensor, dcn_data=m.dcn_data, devices=devices)
    except ConfigError as e:
        raise ConfigError(f"{e} (the topology has {len(devices)} devices; set mesh.* for it, e.g. mesh.fsdp=-1)") \
            from None


def compile_train_step(cfg: TrainConfig, topology: str | TpuSlice) -> CompileReport:
    """Lowers and compiles `cfg`'s train step for `topology` (`mesh.dcn_data` slices of it); see the module
    doc. Raises ConfigError when the mesh does not fit the devices or the batch does not divide them."""
    spec = topology if isinstance(topology, TpuSlice) else tpu_slice(topology)
    devices = topology_devices(spec, num_slices=cfg.mesh.dcn_data)
    mesh = _mesh_for(cfg, devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % rows:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {rows} batch shards of "
                          f"the mesh {dict(mesh.shape)}; make it a multiple of {rows}")
    model = abstract_alm(cfg.model, seed=cfg.seed)
    batch = abstract_batch(cfg, model.encoders[0].config.num_mel_bins if cfg.model.encoders[0].kind == "whisper"
                           else 0, mesh)
    flops = step_flops(model, one_sample(batch), cfg.data.batch_size)["train"]
    fixed_filter = apply_freeze(model, cfg.model)   # staged training: as `alm train` splits it
    graphdef, trainable, frozen = split_trainable(model)
    trainable, fixed = split_fixed(trainable, fixed_filter)
    frozen, model_state = split_model_state(frozen)
    trainable, frozen = _with_shardings(trainable, mesh), _with_shardings(frozen, mesh)
    model_state, fixed = _with_shardings(model_state, mesh), _with_shardings(fixed, mesh)
    tx = make_optimizer(cfg.optim)
    opt_shapes = jax.eval_shape(tx.init, trainable)
    opt_shardings = jax.jit(tx.init).lower(trainable).compile().output_shardings
    replicated = NamedSharding(mesh, P())   # step counters: created outside the mesh by tx.init
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if getattr(s, "mesh", None) == mesh
                                          else replicated), opt_shapes, opt_shardings)
    state = TrainState(trainable, opt_state, model_state, fixed)
    step_fn = build_train_step(graphdef, tx, alm_loss, grad_accum=cfg.optim.grad_accum,
                               schedule=make_schedule(cfg.optim))
    step_index = jax.ShapeDtypeStruct((), jnp.int32)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):   # the layer stacks pin their loop carries to the batch sharding (sharding.constrain)
        lowered = step_fn.lower(state, frozen, batch, step_index)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(f"the train step does not fit {spec.name} ({spec.hbm_bytes / GiB:.0f} GiB HBM per chip, "
                          f"mesh {dict(mesh.shape)}); the TPU compiler says: {str(e).strip().splitlines()[0]} — "
                          f"{FIT_KNOBS}") from None
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))   # noqa: E731
    return CompileReport(
        topology=spec.name if cfg.mesh.dcn_data == 1 else f"{cfg.mesh.dcn_data} x {spec.name}",
        devices=len(devices), mesh=dict(mesh.shape), hbm_bytes=spec.hbm_bytes,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        params={"trainable": count(trainable), "frozen": count(frozen) + count(fixed)},
        model_flops_per_step=int(flops),
        compiled_flops_per_device=float(cost["flops"]) if cost and "flops" in cost else None,
        peak_flops_per_device=spec.peak_flops, lower_seconds=t1 - t0, compile_seconds=t2 - t1)


def format_report(r: CompileReport) -> str:
    """A human-readable summary of a `CompileReport` (per-device memory in GiB, FLOPs, fit)."""
    g = lambda b: f"{b / GiB:8.2f} GiB"   # noqa: E731
    lines = [
        f"topology {r.topology}: {r.devices} devices, mesh {r.mesh}",
        f"parameters: {r.params['trainable'] / 1e6:.1f} M trainable, {r.params['frozen'] / 1e9:.2f} B frozen",
        "memory per device (XLA's plan):",
        f"  arguments    {g(r.argument_bytes)}   (sharded state, frozen weights, batch)",
        f"  outputs      {g(r.output_bytes)}",
        f"  temporaries  {g(r.temp_bytes)}   (activations, gradients, collectives)",
        f"  aliased      {g(r.alias_bytes)}   (donated state reused for outputs, counted once)",
        f"  total        {g(r.total_bytes)}   of {r.hbm_bytes / GiB:.0f} GiB HBM "
        f"({100 * r.total_bytes / r.hbm_bytes:.1f}%): {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  program code {g(r.code_bytes)}",
        f"model FLOPs per step: {r.model_flops_per_step / 1e12:.1f} TFLOP (trainable-aware); "
        + (f"compiled: {r.compiled_flops_per_device / 1e12:.1f} TFLOP per device"
           if r.compiled_flops_per_device is not None else "compiled: n/a"),
        f"step time at 40% MFU: {r.step_seconds_at(0.4):.3f} s "
        f"({r.devices} x {r.peak_flops_per_device / 1e12:.0f} TFLOP/s peak bf16)",
        f"lowering {r.lower_seconds:.1f} s, compile {r.compile_seconds:.1f} s",
    ]
    return "\n".join(lines)


def require_fit(r: CompileReport) -> None:
    """ConfigError when the step would not fit the chip's HBM, naming the numbers and what to change."""
    if not r.fits:
        raise ConfigError(f"the train step needs {r.total_bytes / GiB:.1f} GiB per device on {r.topology} "
                          f"({r.hbm_bytes / GiB:.0f} GiB HBM): {FIT_KNOBS}")
