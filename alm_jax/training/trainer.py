"""The training loop, top to bottom: mesh -> model -> data -> optimizer -> restore -> steps -> evals -> save.

    result = train(cfg, evaluators=build_evaluators(cfg))    # alm_jax.evaluation; `alm train` does this

Each stage lives in its own module; this file only wires them:
  mesh        `alm_jax/sharding.py` (the one logical-axis rule table)
  model       `weights/alm_params.py::build_alm` (frozen encoders + LLM, LoRA, a fresh connector)
  data        `data/multihost.py` (the global batch of any process count, checkpointable iterator)
  step        `training/step.py` (pure: loss, trainable-only grads, accumulation, non-finite guard)
  evals       the `evaluators` given (`alm_jax/evaluation`), each `eval.every` steps
  checkpoints `training/checkpoint.py` (Orbax; the data iterator's state rides along, so a resumed run
              consumes exactly the batches the uninterrupted run would have)
  metrics     `training/metrics.py`; FLOPs `training/flops.py`

Side effects owned here: preemption (SIGTERM/SIGINT -> checkpoint at the current step, clean exit) and the
non-finite guard (a step with a non-finite loss or gradient leaves the state unchanged and is counted; K
in a row stop the run with a `DataError`, and every checkpoint on disk still holds good parameters).

**Metrics** (JSONL/TensorBoard from process 0, every `logging.every` steps): loss, grad_norm, lr,
tokens_per_s (loss tokens of the global batch), samples_per_s, step_time, data_wait, mfu, tflops_per_s,
skipped_steps, bad_samples_by_kind (samples dropped by this process's shards); the evaluators' metrics
(`eval/loss`, ...) every `eval.every` steps. MFU = model FLOPs per step (`flops.step_flops`, trainable
aware) / step wall time / (devices x peak); no peak on CPU, so MFU is None there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from alm_jax.config import ModelConfig, TrainConfig, to_dict
from alm_jax.data.multihost import build_batches, process_rows, to_global
from alm_jax.errors import ConfigError, DataError
from alm_jax.models.alm import split_trainable
from alm_jax.models.connectors import BatchNorm1d
from alm_jax.sharding import host_scalars, mesh_from_config, place_on_mesh, state_shardings
from alm_jax.training.checkpoint import Checkpointer, PreemptionGuard, abstract_with_shardings, resolve_resume
from alm_jax.training.flops import one_sample, peak_flops_per_device, step_flops
from alm_jax.training.metrics import MetricsAggregator, MetricsLogger, StepTimer
from alm_jax.training.step import TrainState, alm_loss, build_train_step, make_optimizer, make_schedule
from alm_jax.weights.alm_params import build_alm


@dataclasses.dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    losses: dict[int, float]        # step (1-based) -> loss, for the steps this run executed
    skipped_steps: int
    stopped_by: str                 # "done" | "preempted" | "nonfinite"
    bad_samples: dict
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)   # step -> eval/loss
    flops_per_step: int | None = None


def refuse_untracked_state(cfg: ModelConfig, model) -> None:
    """The functional step carries params and optimizer state only: per-step mutable state (BatchNorm
    running statistics, dropout RNG counters) would be silently frozen, so refuse it up front."""
    if any(isinstance(m, BatchNorm1d) for _, m in nnx.iter_graph(model.connector)):
        raise ConfigError("model.connector.norm=batch is not supported in training yet (the train step does not "
                          "carry BatchNorm running statistics); use model.connector.norm=layer")
    if cfg.lora.rank > 0 and cfg.lora.dropout > 0:
        raise ConfigError("model.lora.dropout > 0 is not supported in training yet (the train step does not "
                          "advance dropout RNG state); set model.lora.dropout=0")


def _want_sync(cfg: TrainConfig) -> bool:
    """Wait on every step: needed on multi-device CPU, where un-awaited collectives deadlock."""
    if cfg.sync_every_step != "auto":
        return cfg.sync_every_step == "on"
    return jax.devices()[0].platform == "cpu" and jax.device_count() > 1


def _restore(cfg: TrainConfig, ckpt: Checkpointer, state: TrainState, data_iter) -> tuple[TrainState, int]:
    """The state (and, in place, the data iterator) of the checkpoint `cfg.resume` names; `(state, 0)` when
    there is none. Refuses to overwrite an earlier run's checkpoints with resume=none."""
    point = resolve_resume(cfg.resume, cfg.checkpoint.dir)
    if point is None:
        if ckpt.all_steps():
            raise ConfigError(f"checkpoint.dir {cfg.checkpoint.dir} already holds checkpoints {ckpt.all_steps()} "
                              "from an earlier run, and resume=none would not overwrite them; continue with "
                              "resume=auto, or give a new checkpoint.dir (or remove the old one)")
        return state, 0
    same = Path(point.directory).absolute() == ckpt.directory
    reader = ckpt if same else Checkpointer(point.directory, read_only=True)
    saved, _ = reader.restore(point.step, abstract_with_shardings(state.as_dict()), data_iterator=data_iter)
    return TrainState(saved["trainable"], saved["opt_state"]), point.step


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
    if not cfg.data.corpus:
        raise ConfigError("data.corpus is empty; give one or more corpus directories (`alm demo` writes one "
                          "under runs/demo/corpus)")
    if cfg.eval.every > 0 and not evaluators:
        raise ConfigError(f"eval.every={cfg.eval.every} but no evaluators were given; call "
                          "train(cfg, evaluators=alm_jax.evaluation.build_evaluators(cfg)) (`alm train` does), "
                          "or set eval.every=0")
    # ---- mesh and model
    mesh = mesh_from_config(cfg.mesh)
    rows = process_rows(mesh, cfg.data.batch_size)
    model = build_alm(cfg.model, mesh=mesh, seed=cfg.seed)
    refuse_untracked_state(cfg.model, model)
    graphdef, trainable, frozen = split_trainable(model)
    del model   # its arrays live on in (trainable, frozen)
    trainable = jax.device_put(trainable, state_shardings(trainable, mesh))

    # ---- data
    if data_shards is None:
        data_shards = cfg.data.shards or None
    data_iter = build_batches(cfg, cfg.model.llm, cfg.data.corpus, rows=rows, data_shards=data_shards).iterator()

    # ---- optimizer, step, restore
    tx = make_optimizer(cfg.optim)
    state = TrainState(trainable, place_on_mesh(jax.jit(tx.init)(trainable), mesh))
    step_fn = build_train_step(graphdef, tx, alm_loss, grad_accum=cfg.optim.grad_accum,
                               schedule=make_schedule(cfg.optim))
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_config=to_dict(cfg))
    state, start = _restore(cfg, ckpt, state, data_iter)

    # ---- loop
    sync = _want_sync(cfg)
    logger = MetricsLogger.from_config(cfg.logging, total_steps=cfg.steps, process_index=jax.process_index())
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
            batch = timer.fetch(data_iter)
            if agg is None:   # FLOPs need the batch shapes: count them once, at the first batch
                flops_per_step = step_flops(nnx.merge(graphdef, state.trainable, frozen), one_sample(batch),
                                            cfg.data.batch_size)["train"]
                agg = MetricsAggregator(flops_per_step=flops_per_step, num_devices=jax.device_count(),
                                        peak_flops_per_device=peak_flops_per_device())
            if batch_transform is not None:
                batch = batch_transform(step + 1, batch)
            with timer.step():
                state, m = step_fn(state, frozen, to_global(batch, mesh), step)
                if sync:
                    m["loss"].block_until_ready()
            step += 1
            host = host_scalars(m)
            losses[step] = host["loss"]
            skipped = host["skipped"] > 0
            skipped_total += int(skipped)
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            agg.add(loss=host["loss"], tokens=int(host["tokens"]), samples=cfg.data.batch_size,
                    step_time=timer.last_step, data_wait=timer.last_data_wait, grad_norm=host["grad_norm"],
                    skipped=skipped, bad_samples=bad_deltas())
            row: dict[str, Any] = {}
            if evaluators and step % cfg.eval.every == 0:
                evaluated = nnx.merge(graphdef, state.trainable, frozen)
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
            ckpt.save(step, state.as_dict(), data_state=data_iter)
            if guard.should_stop(step):
                ckpt.save(step, state.as_dict(), data_state=data_iter, force=True)
                stopped_by = "preempted"
                break
            if on_step is not None:
                on_step(step, host)
            if stop_after is not None and step - start >= stop_after:
                break
    if stopped_by == "done" and step == cfg.steps:
        ckpt.save(step, state.as_dict(), data_state=data_iter, force=True)
    last = ckpt.latest_step()
    ckpt.close()
    logger.close()
    if stopped_by == "nonfinite":
        raise DataError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (max_bad_steps="
                        f"{cfg.max_bad_steps}); stopped at step {step}. The last good checkpoint is "
                        f"{'step ' + str(last) if last is not None else 'none'} in {cfg.checkpoint.dir} (skipped "
                        "steps do not change the parameters); check the data (bad_samples_by_kind, the batches "
                        "of those steps) or lower optim.lr, then resume.")
    return TrainResult(step=step, losses=losses, skipped_steps=skipped_total, stopped_by=stopped_by,
                       bad_samples=data_iter.bad.to_dict(), eval_losses=eval_losses, flops_per_step=flops_per_step)
