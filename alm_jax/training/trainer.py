"""The training loop, top to bottom: mesh -> model -> data -> optimizer -> restore -> steps -> evals -> save.

    result = train(cfg, evaluators=build_evaluators(cfg))    # alm_jax.evaluation; `alm train` does this

Each stage lives in its own module; this file only wires them:
  mesh        `alm_jax/sharding.py` (the one logical-axis rule table)
  model       `weights/alm_params.py::build_alm` (frozen encoders + LLM, LoRA, a fresh connector); staged
              training `training/staged.py` (`model.init_from`: earlier runs' weights on a fresh start;
              `model.freeze`: learned modules held fixed, in the train state without optimizer state)
  data        `data/multihost.py` (the global batch of any process count, checkpointable iterator)
  step        `training/step.py` (pure: loss, trainable-only grads, accumulation, non-finite guard)
  evals       the `evaluators` given (`alm_jax/evaluation`), each `eval.every` steps
  checkpoints `training/checkpoint.py` (Orbax; the data iterator's state rides along, so a resumed run
              consumes exactly the batches the uninterrupted run would have)
  metrics     `training/metrics.py`; FLOPs `training/flops.py`

Side effects owned here: preemption (SIGTERM/SIGINT -> checkpoint at the current step, clean exit) and the
non-finite guard (a step with a non-finite loss or gradient leaves the state unchanged and is counted; K
in a row stop the run with a `DataError`, and every checkpoint on disk still holds good parameters), the
divergence guard (`training/divergence.py`: a loss / gradient-norm / parameter-norm spike against the
running median stops the run with a `DataError`; the checkpoints of the states that produced it are moved
to `checkpoint.dir/diverged/`, so `resume=auto` continues from the last good one), and data exhaustion
(`data.epochs` > 0 with more steps than the data holds: checkpoint, stop with stopped_by="data_exhausted").

**A run owns its checkpoint directory.** Before anything is built, the resume point is resolved and checked:
- resume=none with checkpoints in checkpoint.dir is refused (resume_discard_later=true deletes them);
- resuming from a step older than the directory's newest (or with corrupt / incomplete step directories
  after it) is refused naming them; resume_discard_later=true deletes them first, so the two runs never mix
  (interrupted saves' tmp directories after the resume point are always deleted);
- the config stored with the checkpoint is compared with this one: a change to a key that alters the data
  order or the math (everything but `config.RESUME_FREE_KEYS`: logging, checkpoint, eval, mesh, steps, ...)
  is refused naming the keys, unless `resume_allow_changes` lists them; an accepted change (and any
  discarded step) is recorded as an "event" row of metrics.jsonl and printed.
Metrics rows of steps after the resume point (from the run that went past it) move to
metrics.discarded.jsonl, so metrics.jsonl holds each step once (`training/metrics.py`).

**Metrics** (JSONL/TensorBoard from process 0, every `logging.every` steps): loss, grad_norm, lr,
tokens_per_s (loss tokens of the global batch), samples_per_s, step_time, data_wait, mfu, tflops_per_s,
skipped_steps, bad_samples_by_kind (samples dropped by this process's shards); the evaluators' metrics
(`eval/loss`, ...) every `eval.every` steps. MFU = model FLOPs per step (`flops.step_flops`, trainable
aware) / step wall time / (devices x peak); no peak on CPU, so MFU is None there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from alm_jax.config import (TrainConfig, check_resume_changes, resume_config_changes, to_dict,
                            validate_train_config)
from alm_jax.data.multihost import build_batches, process_rows, to_global
from alm_jax.errors import CheckpointError, ConfigError, DataError
from alm_jax.models.alm import split_trainable
from alm_jax.sharding import host_scalars, mesh_from_config, place_on_mesh, state_shardings
from alm_jax.training.checkpoint import (DIVERGED_DIR, Checkpointer, PreemptionGuard, ResumePoint,
                                         abstract_with_shardings, remove_entries, resolve_resume, set_aside,
                                         step_entries)
from alm_jax.training.divergence import Divergence, DivergenceGuard
from alm_jax.training.flops import one_sample, peak_flops_per_device, step_flops
from alm_jax.training.metrics import MetricsAggregator, MetricsLogger, StepTimer
from alm_jax.training.staged import apply_freeze, check_init_from, init_from_runs, split_fixed
from alm_jax.training.step import (TrainState, alm_loss, build_train_step, make_optimizer, make_schedule,
                                  split_model_state)
from alm_jax.weights.alm_params import build_alm


@dataclasses.dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    losses: dict[int, float]        # step (1-based) -> loss, for the steps this run executed
    skipped_steps: int
    stopped_by: str                 # "done" | "data_exhausted" | "preempted" (the others raise DataError)
    bad_samples: dict
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)   # step -> eval/loss
    flops_per_step: int | None = None


def _want_sync(cfg: TrainConfig) -> bool:
    """Wait on every step: needed on multi-device CPU, where un-awaited collectives deadlock."""
    if cfg.sync_every_step != "auto":
        return cfg.sync_every_step == "on"
    return jax.devices()[0].platform == "cpu" and jax.device_count() > 1


def _prepare_dir(path: str, key: str) -> None:
    """`path` exists as a writable directory (created when missing), or a ConfigError naming `key`.
    Remote paths (gs://...) are left to Orbax."""
    if "://" in path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; point {key} at a directory (it is created "
                          "when missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be created ({e.strerror or e}); point {key} at a writable "
                          "directory") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable; point {key} at a writable directory")


@dataclasses.dataclass
class _ResumePlan:
    point: ResumePoint | None
    changes: dict                   # accepted config changes: key -> (checkpoint's, this run's)
    discard: list                   # (step, path, kind) entries of checkpoint.dir to delete before training


def _describe_entries(entries) -> str:
    return "[" + ", ".join(str(s) if kind == "finished" else f"{s} ({kind})" for s, _, kind in entries) + "]"


def _plan_resume(cfg: TrainConfig) -> _ResumePlan:
    """Where the run starts and what has to go first; refuses (ConfigError) a start that would mix two runs
    in checkpoint.dir or silently change the config of the run it continues. Reads no arrays."""
    own = Path(cfg.checkpoint.dir)
    point = resolve_resume(cfg.resume, own)
    entries = step_entries(own)
    later = entries if point is None else [e for e in entries if e[0] > point.step]
    kept = [e for e in later if e[2] != "unfinished"]   # interrupted saves' tmp dirs are always cleared
    if point is None:
        if kept and not cfg.resume_discard_later:
            raise ConfigError(f"checkpoint.dir {cfg.checkpoint.dir} already holds checkpoints "
                              f"{_describe_entries(kept)} from an earlier run, and resume={cfg.resume} would not "
                              "overwrite them; continue with resume=auto, give a new checkpoint.dir, or start "
                              "afresh here with resume_discard_later=true (deletes them)")
        return _ResumePlan(None, {}, later)
    changes = {}
    reader = Checkpointer(point.directory, read_only=True)
    try:
        stored = reader.restore_config(point.step)
    finally:
        reader.close()
    if stored is not None:
        changes = check_resume_changes(resume_config_changes(stored, to_dict(cfg)), cfg.resume_allow_changes,
                                       to_dict(cfg), where=f"step {point.step} of {point.directory}")
    if kept and not cfg.resume_discard_later:
        raise ConfigError(f"resume={cfg.resume} continues from step {point.step}, but checkpoint.dir "
                          f"{cfg.checkpoint.dir} holds later steps {_describe_entries(kept)} from a run that went "
                          "past it; training on would mix the two runs (resume=auto would later pick theirs). Add "
                          f"resume_discard_later=true to delete them and continue from step {point.step}, or "
                          "resume from the newest step")
    return _ResumePlan(point, changes, later)


def _restore(plan: _ResumePlan, state: TrainState, data_iter) -> tuple[TrainState, int]:
    """The state (and, in place, the data iterator) of the planned resume point; `(state, 0)` without one."""
    point = plan.point
    if point is None:
        return state, 0
    reader = Checkpointer(point.directory, read_only=True)
    try:
        saved, _ = reader.restore(point.step, abstract_with_shardings(state.as_dict()), data_iterator=data_iter)
    except CheckpointError as e:
        older = [s for s in reader.all_steps() if s < point.step]
        hint = (f"; to continue from an earlier checkpoint instead: resume={older[-1]} resume_discard_later=true"
                if older else "")
        raise CheckpointError(f"{e}{hint}") from e
    finally:
        reader.close()
    return TrainState.from_dict(saved, state.model_state, state.fixed), point.step


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"alm: {msg}", file=sys.stderr, flush=True)


def _diverged_error(cfg: TrainConfig, hit: Divergence, bad: list[int], moved: list[int],
                    good: int | None) -> DataError:
    where = cfg.checkpoint.dir
    parts = [hit.describe() + "."]
    if bad and moved == bad:
        parts.append(f"The checkpoints of the states that produced it ({bad}) were moved to "
                     f"{where}/{DIVERGED_DIR}/.")
    elif bad:   # a remote checkpoint.dir: nothing is moved there
        parts.append(f"Checkpoints {bad} hold the states that produced it; do not resume from them "
                     f"(resume={good} resume_discard_later=true deletes them).")
    if good is None:
        parts.append("No good checkpoint of this run is left; start afresh.")
    elif moved == bad:
        parts.append(f"The last good checkpoint is step {good} in {where}; resume=auto continues from it.")
    parts.append("Lower optim.lr (resume_allow_changes=[optim.lr] when resuming) or check the data of step "
                 f"{hit.step}; the guard's limits are divergence.* (a ratio of 0 turns its check off).")
    return DataError(" ".join(parts))


class _BadSampleDeltas:
    """Samples the data iterator dropped since the previous call, by kind."""

    def __init__(self, data_iter):
        self.data_iter, self.last = data_iter, {}

    def __call__(self) -> dict[str, int]:
        now = self.data_iter.bad.to_dict()["bad"]
        new = {k: v - self.last.get(k, 0) for k, v in now.items() if v - self.last.get(k, 0)}
        self.last = now
        return new


def train(cfg: TrainConfig, *, evaluators: Sequence[Any] = (), stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          batch_transform: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
          data_shards: int | None = None) -> TrainResult:
    """Runs (or resumes) training as configured.

    evaluators: objects with `run(model) -> {metric: value}` (`alm_jax.evaluation.build_evaluators(cfg)`),
    run every `eval.every` steps. stop_after: return after that many steps of this call (tests).
    on_step(step, metrics): called after every step with host values (plus the eval metrics at eval
    steps). batch_transform(step, batch): a test hook that sees (and may replace) this process's numpy
    rows of the batch for 1-based `step` before they go to the devices, e.g. to inject a non-finite batch.
    data_shards: the number of data shards `S` of the global batch (`data/multihost.py`); None =
    `data.shards` (0 = one per process)."""
    validate_train_config(cfg)
    if not cfg.data.corpus:
        raise ConfigError("data.corpus is empty; give one or more corpus directories (`alm demo` writes one "
                          "under runs/demo/corpus)")
    if cfg.eval.every > 0 and not evaluators:
        raise ConfigError(f"eval.every={cfg.eval.every} but no evaluators were given; call "
                          "train(cfg, evaluators=alm_jax.evaluation.build_evaluators(cfg)) (`alm train` does), "
                          "or set eval.every=0")
    _prepare_dir(cfg.checkpoint.dir, "checkpoint.dir")
    _prepare_dir(cfg.logging.dir, "logging.dir")
    plan = _plan_resume(cfg)   # refusals come before anything is built
    if plan.point is None:
        check_init_from(cfg.model.init_from)   # staged training: the earlier runs are there
    # ---- mesh and model
    mesh = mesh_from_config(cfg.mesh)
    rows = process_rows(mesh, cfg.data.batch_size)
    model = build_alm(cfg.model, mesh=mesh, seed=cfg.seed)
    if plan.point is None:   # staged training: earlier runs' weights (a resumed run has them in its checkpoint)
        for line in init_from_runs(model, cfg.model.init_from):
            _say(line)
    fixed_filter = apply_freeze(model, cfg.model)   # model.freeze: their modes, before the graph is split
    graphdef, trainable, frozen = split_trainable(model)
    trainable, fixed = split_fixed(trainable, fixed_filter)   # held fixed: no gradient, no optimizer state
    frozen, model_state = split_model_state(frozen)   # BatchNorm running statistics ride in the train state
    del model   # its arrays live on in (trainable, model_state, frozen)
    trainable = jax.device_put(trainable, state_shardings(trainable, mesh))
    fixed = jax.device_put(fixed, state_shardings(fixed, mesh))
    model_state = jax.device_put(model_state, state_shardings(model_state, mesh))   # as the step returns it: no
                                                                                     # second compile at step 2

    # ---- data
    if data_shards is None:
        data_shards = cfg.data.shards or None
    data_iter = build_batches(cfg, cfg.model.llm, cfg.data.corpus, rows=rows, data_shards=data_shards).iterator()

    # ---- optimizer, step, restore
    tx = make_optimizer(cfg.optim)
    state = TrainState(trainable, place_on_mesh(jax.jit(tx.init)(trainable), mesh), model_state, fixed)
    step_fn = build_train_step(graphdef, tx, alm_loss, grad_accum=cfg.optim.grad_accum,
                               schedule=make_schedule(cfg.optim))
    state, start = _restore(plan, state, data_iter)
    discarded = sorted({s for s, _, kind in plan.discard if kind != "unfinished"})
    if plan.discard:
        if jax.process_index() == 0:
            remove_entries([p for _, p, _ in plan.discard])
        _sync("alm-discard-later-steps")
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_config=to_dict(cfg))

    # ---- loop
    sync = _want_sync(cfg)
    logger = MetricsLogger.from_config(cfg.logging, total_steps=cfg.steps, process_index=jax.process_index(),
                                       start_step=start)
    if plan.changes or discarded:
        logger.event(start, "resume", from_step=start, resumed=str(plan.point.directory) if plan.point else None,
                     config_changes={k: [a, b] for k, (a, b) in plan.changes.items()}, discarded_steps=discarded)
        if plan.changes:
            _say(f"resuming from step {start} with config changes accepted by resume_allow_changes: "
                 + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in plan.changes.items()))
        if discarded:
            _say(f"deleted checkpoints {discarded} of {cfg.checkpoint.dir} (resume_discard_later=true)")
    guard_div = DivergenceGuard(cfg.divergence)
    param_norm = jax.jit(optax.tree.norm) if guard_div.wants_param_norm else None
    if param_norm is not None:
        guard_div = DivergenceGuard(cfg.divergence,
                                    param_norm=host_scalars({"p": param_norm(state.trainable)})["p"])
    diverged: Divergence | None = None
    timer, bad_deltas = StepTimer(), _BadSampleDeltas(data_iter)
    flops_per_step: int | None = None
    agg: MetricsAggregator | None = None
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    consecutive_bad = skipped_total = 0
    stopped_by = "done"
    step = start
    with PreemptionGuard() as guard:
        while step < cfg.steps:
            try:
                batch = timer.fetch(data_iter)
            except StopIteration:   # data.epochs passes are done before `steps`
                stopped_by = "data_exhausted"
                break
            if agg is None:   # FLOPs need the batch shapes: count them once, at the first batch
                flops_per_step = step_flops(nnx.merge(graphdef, state.trainable, frozen, state.model_state,
                                                      state.fixed), one_sample(batch),
                                            cfg.data.batch_size)["train"]
                agg = MetricsAggregator(flops_per_step=flops_per_step, num_devices=jax.device_count(),
                                        peak_flops_per_device=peak_flops_per_device())
            if batch_transform is not None:
                batch = batch_transform(step + 1, batch)
            with timer.step():
                with jax.set_mesh(mesh):   # layer stacks pin their loop carries to it (sharding.constrain)
                    state, m = step_fn(state, frozen, to_global(batch, mesh), step)
                if sync:
                    m["loss"].block_until_ready()
                host = host_scalars(m)   # waits for the step: step_time is its compute, not just its dispatch
            step += 1
            losses[step] = host["loss"]
            skipped = host["skipped"] > 0
            skipped_total += int(skipped)
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            agg.add(loss=host["loss"], tokens=int(host["tokens"]), samples=cfg.data.batch_size,
                    step_time=timer.last_step, data_wait=timer.last_data_wait, grad_norm=host["grad_norm"],
                    skipped=skipped, bad_samples=bad_deltas())
            row: dict[str, Any] = {}
            if evaluators and step % cfg.eval.every == 0:
                evaluated = nnx.merge(graphdef, state.trainable, frozen, state.model_state, state.fixed)
                evaluated.eval()   # running statistics, no dropout; evaluators never update the train state
                for ev in evaluators:
                    row.update(ev.run(evaluated))
                host.update(row)
                if "eval/loss" in row:
                    eval_losses[step] = row["eval/loss"]
            if cfg.logging.every and step % cfg.logging.every == 0:
                summary = agg.summary(lr=host.get("lr"))
                wall = summary["step_time"] + summary["data_wait"]
                summary["tflops_per_s"] = flops_per_step / wall / 1e12 if wall > 0 else None
                row = {**summary, **row}
            if row:
                logger.log(step, row)
            if consecutive_bad >= cfg.max_bad_steps:
                stopped_by = "nonfinite"
                break
            diverged = guard_div.check(
                step, loss=host["loss"], grad_norm=host["grad_norm"], skipped=skipped,
                param_norm=host_scalars({"p": param_norm(state.trainable)})["p"] if param_norm else None)
            if diverged is not None:   # before the save: a diverged state is never checkpointed
                logger.event(step, "diverged", metric=diverged.metric, value=diverged.value,
                             median=diverged.median, good_bound=diverged.good_bound)
                stopped_by = "diverged"
                break
            ckpt.save(step, state.as_dict(), data_state=data_iter)
            if guard.should_stop(step):
                ckpt.save(step, state.as_dict(), data_state=data_iter, force=True)
                stopped_by = "preempted"
                break
            if on_step is not None:
                on_step(step, host)
            if stop_after is not None and step - start >= stop_after:
                break
    if step > start and ((stopped_by == "done" and step == cfg.steps) or stopped_by == "data_exhausted"):
        ckpt.save(step, state.as_dict(), data_state=data_iter, force=True)
    ckpt.wait()
    last = ckpt.latest_step()
    saved = ckpt.all_steps()
    ckpt.close()
    logger.close()
    if diverged is not None:
        bad = [s for s in saved if s > max(diverged.good_bound, start)]
        moved = set_aside(cfg.checkpoint.dir, bad) if jax.process_index() == 0 else bad
        _sync("alm-set-aside-diverged")
        raise _diverged_error(cfg, diverged, bad, sorted(moved), max((s for s in saved if s not in bad), default=None))
    if stopped_by == "data_exhausted":
        _say(f"the data ran out after step {step} (data.epochs={cfg.data.epochs}, steps={cfg.steps}); "
             f"checkpointed step {step} and stopped")
    if stopped_by == "nonfinite":
        raise DataError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (max_bad_steps="
                        f"{cfg.max_bad_steps}); stopped at step {step}. The last good checkpoint is "
                        f"{'step ' + str(last) if last is not None else 'none'} in {cfg.checkpoint.dir} (skipped "
                        "steps do not change the parameters); check the data (bad_samples_by_kind, the batches "
                        "of those steps) or lower optim.lr, then resume.")
    return TrainResult(step=step, losses=losses, skipped_steps=skipped_total, stopped_by=stopped_by,
                       bad_samples=data_iter.bad.to_dict(), eval_losses=eval_losses, flops_per_step=flops_per_step)
