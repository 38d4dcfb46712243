"""The `bundle` export: any ALM (every connector and fusion), as trained, and `alm import` that rebuilds it.

    BUNDLE/
      bundle.json                  format version, step, the run's model config, the frozen parts' directories
      trainable.safetensors        the trained weights (connector, LoRA) under their state paths, float32
                                   (sharded + index past --max-shard-size)
      tokenizer/                   the LLM's tokenizer files and chat template
      base/llm, base/encoder-<i>   with --copy-base: copies of the frozen models (else bundle.json names them)
      README.md                    a model card: recipe, data, training settings, the run's latest evaluations

`load_bundle(BUNDLE) -> (ModelConfig, AudioLanguageModel)`: the frozen parts from their directories (copied
or referenced), the trained ones from the safetensors, every key checked (missing, unexpected and mis-shaped
keys are errors naming the key).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import ModelConfig, from_dict, to_dict, with_legacy_model_values
from alm_jax.errors import CheckpointError, ConfigError
from alm_jax.export.llm import copy_side_files
from alm_jax.export.model_card import model_card
from alm_jax.export.source import TrainedRun, host_array
from alm_jax.export.writer import ShardedSafetensorsWriter
from alm_jax.models.alm import RUNNING_STATE, AudioLanguageModel, split_trainable
from alm_jax.weights.alm_params import build_alm
from alm_jax.weights.hf_import import open_safetensors

FORMAT = "alm_jax.bundle"
VERSION = 1


def unsupported(run: TrainedRun) -> str | None:
    return None   # a bundle stores any model


def _flat_trainable(model: AudioLanguageModel) -> dict[str, Any]:
    """What a run learned, by dotted path: the trainable parameters and the running state (`RUNNING_STATE`)."""
    _, trainable, _ = split_trainable(model)
    learned = nnx.merge_state(trainable, nnx.state(model, RUNNING_STATE))
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(learned)}


def export(run: TrainedRun, out: str | Path, *, dtype: str = "float32", max_shard_bytes: int = 5 * 10 ** 9,
           copy_base: bool = False) -> list[str]:
    """Writes the bundle of `run` into `out` (see the module docstring). Trained weights stay float32 whatever
    `dtype` says (they are small, and training keeps them float32); `dtype` is recorded as the model's compute
    dtype for `alm import`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = run.cfg.model
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes, prefix="trainable",
                                      metadata={"format": "alm_jax"})   # one key: safetensors orders several at random
    for name, var in _flat_trainable(run.model).items():
        writer.add(name, host_array(var[...]).astype(np.float32))
    files = writer.close()
    base: dict[str, Any] = {"llm": str(Path(model_cfg.llm).resolve()),
                            "encoders": [str(Path(e.path).resolve()) for e in model_cfg.encoders]}
    if copy_base:
        base = {"llm": _copy_dir(model_cfg.llm, out / "base" / "llm"),
                "encoders": [_copy_dir(e.path, out / "base" / f"encoder-{i}") for i, e in enumerate(model_cfg.encoders)]}
        files.append("base/")
    tok = out / "tokenizer"
    tok.mkdir(exist_ok=True)
    files += [f"tokenizer/{f}" for f in copy_side_files(model_cfg.llm, tok)]
    meta = {"format": FORMAT, "version": VERSION, "step": run.step, "dtype": dtype,
            "model": to_dict(dataclasses.replace(model_cfg, dtype=dtype)), "base": base,
            "base_copied": copy_base, "checkpoint": str(run.directory.resolve()), "run": run.stored_config}
    (out / "bundle.json").write_text(json.dumps(meta, indent=2))
    (out / "README.md").write_text(model_card(run, fmt="bundle"))
    return files + ["bundle.json", "README.md"]


def _copy_dir(src: str, dst: Path) -> str:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return str(dst.relative_to(dst.parent.parent))   # "base/llm", relative to the bundle


def read_bundle(path: str | Path) -> dict:
    """bundle.json of `path`, checked (format, version, the frozen parts' directories exist)."""
    path = Path(path)
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise ConfigError(f"{path} is not an alm_jax bundle (no bundle.json); write one with "
                          "`alm export CHECKPOINT_DIR --format bundle --out DIR`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                          f"alm_jax reads {FORMAT!r} version {VERSION}")
    return meta


def bundle_model_config(path: str | Path, meta: dict | None = None) -> ModelConfig:
    """The bundle's ModelConfig with the frozen parts' directories resolved (copied ones inside the bundle)."""
    path = Path(path)
    meta = meta or read_bundle(path)
    cfg = from_dict(ModelConfig, with_legacy_model_values(meta["model"]))

    def where(p: str, what: str) -> str:
        d = Path(p) if Path(p).is_absolute() else path / p
        if not d.is_dir():
            raise ConfigError(f"bundle {path}: the {what} directory {d} does not exist; export with --copy-base "
                              "to carry the frozen models inside the bundle, or restore that directory")
        return str(d)

    encoders = tuple(dataclasses.replace(e, path=where(p, f"encoder {i}"))
                     for i, (e, p) in enumerate(zip(cfg.encoders, meta["base"]["encoders"])))
    return dataclasses.replace(cfg, llm=where(meta["base"]["llm"], "LLM"), encoders=encoders)


def _stored_tensors(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of the bundle that holds it."""
    index = path / "trainable.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "trainable.safetensors"
    if not single.is_file():
        raise CheckpointError(f"bundle {path} has no trainable.safetensors")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def import_bundle(path: str | Path, out: str | Path | None = None) -> tuple[AudioLanguageModel, int]:
    """`alm import`: rebuild the bundle's model (every key checked); with `out`, write it as a checkpoint
    directory (run config + trained weights at the bundle's step) that `alm eval` and `alm export` read."""
    from alm_jax.config import TrainConfig
    from alm_jax.training.checkpoint import save_trained
    cfg, model, step = load_bundle(path)
    if out is not None:
        run_cfg = TrainConfig(model=cfg)
        stored = read_bundle(path).get("run") or {}
        stored_cfg = from_dict(TrainConfig, stored) if stored else run_cfg
        run_cfg = dataclasses.replace(stored_cfg, model=cfg,
                                      checkpoint=dataclasses.replace(stored_cfg.checkpoint, dir=str(out)))
        save_trained(model, out, step, to_dict(run_cfg))
    return model, step


def load_bundle(path: str | Path, *, mesh=None) -> tuple[ModelConfig, AudioLanguageModel, int]:
    """(model config, the ALM with its trained weights, the training step) of bundle `path`."""
    path = Path(path)
    meta = read_bundle(path)
    cfg = bundle_model_config(path, meta)
    model = build_alm(cfg, mesh=mesh)
    target = _flat_trainable(model)
    stored = _stored_tensors(path)
    missing, unexpected = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
    if missing or unexpected:
        raise CheckpointError(f"bundle {path} does not fit the model its config builds: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    for file in sorted(set(stored.values())):          # each shard opened once
        with open_safetensors(file) as f:
            for name in sorted(n for n, where in stored.items() if where == file):
                var, value = target[name], f.get_tensor(name)
                if tuple(value.shape) != tuple(var.shape):
                    raise CheckpointError(f"bundle {path}: {name} has shape {tuple(value.shape)}, the model wants "
                                          f"{tuple(var.shape)}")
                old = var[...]
                var.set_value(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))
    model.eval()   # for inference: running statistics, no dropout
    return cfg, model, int(meta["step"])
