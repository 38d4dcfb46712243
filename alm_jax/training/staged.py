"""Staged training: learned modules held fixed (`model.freeze`) and weights started from earlier runs
(`model.init_from`), as ALARM-CA and ALARM-P train: single-encoder adapters first, then loaded frozen while
only the fusion trains.

    init_from_runs(model, cfg.model.init_from)       # a fresh start: copy adapters of earlier runs in
    fixed_filter = apply_freeze(model, cfg.model)    # before the split: frozen modules' mode, the filter
    trained, fixed = split_fixed(trainable, fixed_filter)

Paths are dotted module / parameter paths of the model (`connector.adapters.0.conv1.kernel`; list items by
index). A `freeze` pattern is an fnmatch glob matched against every path and each of its prefixes, so
`connector.adapters.0` and `connector.adapters.*` both name whole modules.

What a frozen module is in a run:
- its parameters get no gradient and no optimizer state (they travel in `TrainState.fixed`);
- the checkpoint saves them with the trained ones in its `trainable` item (every learned parameter of the
  run, what `alm eval` / `alm export` / `restore_params` read); only `opt_state` is limited to the trained
  ones. A resumed run reads them from its own checkpoint, never again from `init_from`;
- `model.frozen_mode=eval` (default): a module a pattern names runs in eval mode in training (`module.eval()`:
  BatchNorm normalizes with its running statistics and leaves them as they are, dropout is off);
  `train`: it keeps training mode, as ALARM's public code does (its frozen adapters only lose their
  gradients: BatchNorm normalizes with batch statistics and keeps updating its running statistics).
  A pattern that names single parameters (not a module) changes no mode.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from alm_jax.config import InitFromConfig, ModelConfig
from alm_jax.errors import CheckpointError, ConfigError

Path = tuple


def dotted(path: Path) -> str:
    """`("connector", "adapters", 0, "conv1")` -> "connector.adapters.0.conv1"."""
    return ".".join(str(p) for p in path)


def _named(path: str, patterns: Sequence[str]) -> bool:
    """Whether `path` or one of its prefixes matches one of `patterns`."""
    parts = path.split(".")
    prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def fixed_filter(patterns: Sequence[str]):
    """An nnx filter `(path, value) -> bool`: the variables `patterns` name (see the module doc)."""
    patterns = tuple(patterns)
    return lambda path, _value: _named(dotted(path), patterns)


def apply_freeze(model: nnx.Module, cfg: ModelConfig, trainable=None):
    """Checks `cfg.freeze` against the learned parameters `trainable` (default: `models.alm.split_trainable`'s)
    and, with `cfg.frozen_mode == "eval"`, puts the modules the patterns name into eval mode, in place. Returns
    the filter of the fixed parameters (`split_fixed`), or None when nothing is frozen. A pattern that names
    no learned parameter is a ConfigError (a typo would otherwise train everything)."""
    if not cfg.freeze:
        return None
    if trainable is None:
        from alm_jax.models.alm import split_trainable
        trainable = split_trainable(model)[1]
    learned = [dotted(p) for p, _ in nnx.to_flat_state(trainable)]
    for i, pat in enumerate(cfg.freeze):
        if not pat or not any(_named(p, [pat]) for p in learned):
            tops = sorted({".".join(p.split(".")[:3]) for p in learned})
            raise ConfigError(f"model.freeze.{i}={pat!r} names no learned parameter; give dotted paths of the "
                              f"connector or LoRA (fnmatch globs allowed), e.g. {tops[:8]}")
    if all(_named(p, cfg.freeze) for p in learned):
        raise ConfigError(f"model.freeze={list(cfg.freeze)} freezes every learned parameter; nothing would "
                          "train. Leave the modules that should train out of it")
    if cfg.frozen_mode == "eval":
        for path, node in nnx.iter_graph(model):
            if path and isinstance(node, nnx.Module) and any(fnmatch.fnmatchcase(dotted(path), pat)
                                                             for pat in cfg.freeze):
                node.eval()
    return fixed_filter(cfg.freeze)


def split_fixed(trainable, filt) -> tuple[Any, Any]:
    """`(trained, fixed)`: the learned state split by `apply_freeze`'s filter (fixed empty when it is None)."""
    if filt is None:
        return trainable, nnx.State({})
    fixed, trained = nnx.filter_state(trainable, filt, ...)
    return trained, fixed


# ------------------------------------------------------------------------------------------- init_from

LEARNED = nnx.Any(nnx.Param, nnx.BatchStat)   # what init_from copies: weights and BatchNorm statistics


def check_init_from(specs: Sequence[InitFromConfig]) -> None:
    """The cheap checks of `model.init_from`, before any weight is loaded: each entry names a run directory that
    holds the step it asks for (a finished checkpoint) and a non-empty map of pairs; ConfigError otherwise."""
    from alm_jax.training.checkpoint import resolve_resume
    for i, spec in enumerate(specs):
        key = f"model.init_from.{i}"
        if not spec.run:
            raise ConfigError(f"{key}.run is empty; give the checkpoint directory of the earlier run")
        if not spec.map:
            raise ConfigError(f"{key}.map is empty; give {{path there: path here}}, e.g. "
                              "{connector.adapters.0: connector.adapters.0}")
        for j, pair in enumerate(spec.map):
            if len(pair) != 2 or not all(pair):
                raise ConfigError(f"{key}.map.{j}={list(pair)!r}: give a mapping {{path there: path here}}")
        try:
            point = resolve_resume(spec.step if spec.step else "auto", spec.run)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from e
        if point is None:
            raise ConfigError(f"{key}.run={spec.run} holds no finished checkpoint; give the checkpoint.dir of the "
                              "earlier run (train it first)")


def init_from_runs(model: nnx.Module, specs: Sequence[InitFromConfig]) -> list[str]:
    """Copies, in place, the learned weights and BatchNorm statistics of earlier runs into `model` as `specs`
    (`model.init_from`) say; returns one line per copied path for the log. Strict: every variable under a
    mapped source path must find its place here and every variable under the target path must be covered,
    with equal shapes; otherwise a ConfigError naming the paths."""
    from alm_jax.training.checkpoint import read_learned
    target = {dotted(p): v for p, v in nnx.to_flat_state(nnx.state(model, LEARNED))}
    done: list[str] = []
    check_init_from(specs)
    for i, spec in enumerate(specs):
        key = f"model.init_from.{i}"
        wanted: dict[str, str] = {}   # source path -> target path
        for src, dst in ((a.strip("."), b.strip(".")) for a, b in spec.map):
            here = [t for t in target if t == dst or t.startswith(dst + ".")]
            if not here:
                raise ConfigError(f"{key}.map: {dst!r} names nothing of this model; its learned modules include "
                                  f"{sorted({'.'.join(t.split('.')[:3]) for t in target})[:8]}")
            for t in here:
                wanted[src + t[len(dst):]] = t
        try:
            found, step = read_learned(spec.run, spec.step or None, [p[0].strip(".") for p in spec.map])
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from e
        missing = sorted(s for s in wanted if s not in found)
        extra = sorted(s for s in found if s not in wanted)
        if missing or extra:
            parts = ([f"not in the run: {missing[:6]}"] if missing else []) + (
                [f"in the run but without a place here: {extra[:6]}"] if extra else [])
            raise ConfigError(f"{key}: {spec.run} (step {step}) does not fit this model under the mapped paths: "
                              f"{'; '.join(parts)}. Map modules of the same architecture")
        for src, dst in wanted.items():
            var, value = target[dst], found[src]
            if tuple(value.shape) != tuple(var.shape):
                raise ConfigError(f"{key}: {src} of {spec.run} has shape {tuple(value.shape)}, but {dst} here is "
                                  f"{tuple(var.shape)}; map modules of the same architecture")
            old = var[...]
            sharding = getattr(old, "sharding", None)
            new = np.asarray(value).astype(old.dtype)
            var.set_value(jax.device_put(new, sharding) if sharding is not None else jax.numpy.asarray(new))
        done.append(f"{key}: {len(wanted)} arrays from {spec.run} step {step} "
                    f"({', '.join(f'{a} -> {b}' for a, b in spec.map)})")
    return done
