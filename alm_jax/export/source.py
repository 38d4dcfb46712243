"""A trained run, rebuilt from its checkpoint directory alone (the run config is stored with every step), and
the tensor-by-tensor gather that export writes from.

    run = load_run("runs/x/checkpoints", step=None)      # run.cfg, run.model (trained weights in), run.step
    for path, array in host_tensors(run.model.llm): ...  # numpy, one tensor at a time (multi-host: gathered)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from alm_jax.config import TrainConfig, apply_override, from_dict, with_legacy_model_values
from alm_jax.errors import ConfigError
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.models.stack import stacks, unstack
from alm_jax.sharding import make_mesh, mesh_from_config
from alm_jax.training.checkpoint import Checkpointer, restore_params
from alm_jax.weights.alm_params import build_alm
from alm_jax.weights.demo_models import resolve_demo_paths


@dataclasses.dataclass
class TrainedRun:
    cfg: TrainConfig             # the run's config (demo: names resolved to local directories)
    model: AudioLanguageModel    # frozen parts from their directories, trained parts from the checkpoint
    step: int
    directory: Path
    stored_config: dict          # the config as the checkpoint stores it


def run_config(directory: str | Path, step: int | None = None, overrides: Sequence[str] = ()
               ) -> tuple[TrainConfig, dict]:
    """(the config, as the checkpoint stores it) of the run whose `checkpoint.dir` is `directory`, at `step`
    (None = the latest), with older runs' model defaults filled in, `overrides` (dotted `key=value`, not
    `model.*`) applied and demo model names resolved."""
    reader = Checkpointer(directory, read_only=True)
    try:
        stored = reader.restore_config(step)
    finally:
        reader.close()
    if stored is None:
        raise ConfigError(f"{directory} holds no run config; give the checkpoint.dir of an `alm train` run")
    data = dict(stored)
    data["model"] = with_legacy_model_values(data.get("model", {}))   # a run from before scan_layers: unrolled
    for override in overrides:
        if override.split("=", 1)[0].strip().startswith("model."):
            raise ConfigError(f"{override}: the model is the checkpoint's; only data/eval settings may change")
        data = apply_override(data, override)
    return resolve_demo_paths(from_dict(TrainConfig, data)), stored


def load_run(directory: str | Path, step: int | None = None, *, overrides: Sequence[str] = (),
             mesh=None) -> TrainedRun:
    """The run whose `checkpoint.dir` is `directory`, at `step` (None = the latest). `overrides`: dotted
    `key=value` changes to the stored config that do not touch the model (data/eval settings). `mesh`: where the
    model lives; None = the run's `mesh` settings over this process's devices (all of them on `data` when those
    settings do not fit here), so the model sits on the mesh the evaluators shard their batches over."""
    cfg, stored = run_config(directory, step, overrides)
    if mesh is None:
        mesh = eval_mesh(cfg)
    model, step = restore_params(build_alm(cfg.model, seed=cfg.seed, mesh=mesh), directory, step, mesh=mesh)
    model.eval()   # a trained run is for inference: running statistics, no dropout
    return TrainedRun(cfg=cfg, model=model, step=step, directory=Path(directory), stored_config=stored)

def eval_mesh(cfg: TrainConfig):
    """The run's mesh (`mesh_from_config`) on this process's devices, or all of them along `data` when the run's
    sizes do not fit this process (a run trained with fsdp=4, read back on one device)."""
    try:
        return mesh_from_config(cfg.mesh)
    except ConfigError as err:
        print(f"note: the run's mesh does not fit {jax.device_count()} device(s) here ({err}); "
              "using all of them along `data`", flush=True)
        return make_mesh()


def host_array(x) -> np.ndarray:
    """One (possibly sharded, possibly multi-host) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def host_tensors(module: nnx.Module, variable_type=nnx.Param) -> Iterator[tuple[str, np.ndarray]]:
    """(dotted per-layer state path, numpy array) for every `variable_type` variable of `module`, one at a
    time; a scanned stack's `[L, ...]` variables come out layer by layer (`layers.3.fc1.kernel`)."""
    found = stacks(module)
    for path, var in nnx.to_flat_state(nnx.state(module, variable_type)):
        value = var[...] if hasattr(var, "__getitem__") else var.value
        for one_path, one in unstack(tuple(path), value, found):
            yield ".".join(str(p) for p in one_path), host_array(one)
