"""The training loop, top to bottom: mesh -> model -> data -> optimizer -> restore -> steps -> save.

    summary = train(load_config("configs/demo.yaml", ["optim.lr=3e-4"]))

The step itself is pure (`training/step.py`); this loop owns every side effect: data, checkpoints
(with the data iterator's state, so a resumed run consumes exactly the batches the uninterrupted run
would have), metrics, preemption (SIGTERM/SIGINT -> checkpoint at the current step, clean exit) and the
non-finite guard (K skipped steps in a row stop the run, keeping the last good checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import ModelConfig, TrainConfig, to_dict
from alm_jax.errors import ConfigError, DataError
from alm_jax.training.mesh import batch_sharding, make_mesh, state_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_model_path(path: str) -> str:
    """`demo:<name>` -> the converted bundled model directory; anything else is a local HF directory."""
    if not path.startswith("demo:"):
        if not Path(path).is_dir():
            raise ConfigError(f"model path {path!r} is not a directory; give a local Hugging Face directory "
                              "or demo:smollm2-135m-instruct / demo:whisper-tiny.en")
        return path
    from alm_jax.weights.demo_models import prepare_demo
    models = prepare_demo(verbose=False)
    name = path[len("demo:"):]
    table = {"smollm2-135m-instruct": models.llm, "whisper-tiny.en": models.whisper}
    if name not in table:
        raise ConfigError(f"unknown demo model {path!r}; choose one of {['demo:' + k for k in table]}")
    return str(table[name])


def build_model(cfg: ModelConfig, *, mesh=None, seed: int = 0):
    """Frozen encoders + LLM loaded from their directories (in the compute dtype), LoRA if configured,
    and a fresh float32 connector. Returns `(model, llm_dir)`."""
    from alm_jax.models.alm import AudioLanguageModel
    from alm_jax.models.llm import load_llm
    from alm_jax.models.lora import apply_lora
    from alm_jax.models.whisper import load_whisper_encoder

    dtype = DTYPES[cfg.dtype]
    llm_dir = resolve_model_path(cfg.llm)
    llm = load_llm(llm_dir, dtype=dtype, mesh=mesh)
    encoders = [load_whisper_encoder(resolve_model_path(e.path), dtype=dtype, mesh=mesh) for e in cfg.encoders]
    rngs = nnx.Rngs(seed)
    if cfg.lora.rank > 0:
        apply_lora(llm, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target, rngs=rngs)
    model = AudioLanguageModel(encoders, llm, cfg.connector, cfg.encoders, dtype=dtype, param_dtype=jnp.float32,
                               rngs=rngs)
    return model, llm_dir


def alm_loss(model, batch) -> tuple[jax.Array, jax.Array, dict]:
    """Token-summed cross-entropy over the loss mask, and the token count (see step.masked_cross_entropy)."""
    from alm_jax.training.step import masked_cross_entropy
    s, n = masked_cross_entropy(model(batch), batch["targets"], batch["loss_mask"])
    return s, n, {}


def build_dataset(cfg: TrainConfig, model, llm_dir: str, corpora, *, shuffle=True, epochs=None, seed_offset=0):
    """The Grain pipeline for this process (its share of the global batch)."""
    from transformers import AutoTokenizer

    from alm_jax.data.corpus import Corpus
    from alm_jax.data.pipeline import AudioSpec, PipelineConfig, SampleBuilder, make_dataset
    from alm_jax.data.templates import ChatTokenizer

    if not corpora:
        raise ConfigError("data.corpus is empty; give one or more corpus directories (alm prepare / alm demo "
                          "writes one)")
    pc = jax.process_count()
    if cfg.data.batch_size % pc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {pc} processes")
    enc0 = cfg.model.encoders[0]
    buffer_seconds = enc0.pad_to_seconds or cfg.data.max_audio_seconds
    count = model.token_count
    audio = AudioSpec(tokens_for_samples=count, max_audio_tokens=count(int(buffer_seconds * 16000)),
                      pad_to_seconds=enc0.pad_to_seconds, max_seconds=cfg.data.max_audio_seconds)
    tok = ChatTokenizer(AutoTokenizer.from_pretrained(llm_dir))
    builder = SampleBuilder(tok, audio, cfg.data.max_text_tokens, cfg.data.max_clips)
    pcfg = PipelineConfig(batch_size=cfg.data.batch_size // pc, seq_len=cfg.data.max_text_tokens,
                          max_clips=cfg.data.max_clips, seed=cfg.data.seed + seed_offset, shuffle=shuffle,
                          epochs=epochs if epochs is not None else (cfg.data.epochs or None),
                          fraction=cfg.data.fraction, num_workers=cfg.data.num_workers,
                          bad_fraction_limit=cfg.data.bad_fraction_limit,
                          process_index=jax.process_index(), process_count=pc)
    sources = [Corpus(c).source for c in corpora]
    weights = cfg.data.weights or None
    return make_dataset(sources, builder, pcfg, weights=weights)


def _global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def _want_sync(cfg: TrainConfig) -> bool:
    if cfg.sync_every_step != "auto":
        return cfg.sync_every_step == "on"
    return jax.devices()[0].platform == "cpu" and jax.device_count() > 1


@dataclasses.dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    losses: dict[int, float]        # step (1-based) -> loss, for the steps this run executed
    skipped_steps: int
    stopped_by: str                 # "done" | "preempted" | "nonfinite"
    bad_samples: dict


def train(cfg: TrainConfig, *, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Runs (or resumes) training as configured. `stop_after`: return after that many steps of this call
    (tests). `on_step(step, metrics)` is called after every step with host values."""
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.checkpoint import Checkpointer, PreemptionGuard, abstract_with_shardings, resolve_resume
    from alm_jax.training.metrics import MetricsAggregator, MetricsLogger, StepTimer
    from alm_jax.training.step import build_train_step, make_optimizer, make_schedule

    # ---- mesh and model
    mesh = make_mesh(cfg.mesh.data * cfg.mesh.dcn_data if cfg.mesh.data != -1 else -1, cfg.mesh.fsdp, cfg.mesh.tensor)
    model, llm_dir = build_model(cfg.model, mesh=mesh, seed=cfg.seed)
    graphdef, trainable, frozen = split_trainable(model)
    trainable = jax.device_put(trainable, state_shardings(trainable, mesh))
    sched = make_schedule(cfg.optim)
    tx = make_optimizer(cfg.optim)
    opt_state = jax.jit(tx.init)(trainable)
    step_fn = build_train_step(graphdef, tx, alm_loss, grad_accum=cfg.optim.grad_accum, schedule=sched)

    # ---- data
    dataset = build_dataset(cfg, model, llm_dir, cfg.data.corpus)
    data_iter = iter(dataset)

    # ---- restore
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_config=to_dict(cfg))
    start = 0
    point = resolve_resume(cfg.resume, cfg.checkpoint.dir)
    if point is not None:
        target = {"trainable": trainable, "opt_state": opt_state}
        abstract = abstract_with_shardings(target)
        reader = ckpt if Path(point.directory).absolute() == ckpt.directory else Checkpointer(point.directory, read_only=True)
        state, _ = reader.restore(point.step, abstract, data_iterator=data_iter)
        trainable, opt_state = state["trainable"], state["opt_state"]
        start = point.step

    logger = MetricsLogger.from_config(cfg.logging, total_steps=cfg.steps, process_index=jax.process_index())
    agg = MetricsAggregator(num_devices=jax.device_count())
    timer = StepTimer()
    sync = _want_sync(cfg)
    losses: dict[int, float] = {}
    consecutive_bad = skipped_total = 0
    stopped_by = "done"
    last_bad = {}
    step = start
    with PreemptionGuard() as guard:
        while step < cfg.steps:
            batch = timer.fetch(data_iter)
            tokens, samples = float(batch["loss_mask"].sum()), batch["input_ids"].shape[0]
            with timer.step():
                trainable, opt_state, m = step_fn(trainable, opt_state, frozen, _global_batch(batch, mesh), step)
                if sync:
                    m["loss"].block_until_ready()
            step += 1
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            losses[step] = host["loss"]
            skipped = host["skipped"] > 0
            skipped_total += int(skipped)
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            bad_now = data_iter.bad.to_dict()["bad"] if hasattr(data_iter, "bad") else {}
            new_bad = {k: v - last_bad.get(k, 0) for k, v in bad_now.items() if v - last_bad.get(k, 0)}
            last_bad = bad_now
            agg.add(loss=host["loss"], tokens=int(tokens * jax.process_count()), samples=samples * jax.process_count(),
                    step_time=timer.last_step, data_wait=timer.last_data_wait, grad_norm=host["grad_norm"],
                    skipped=skipped, bad_samples=new_bad)
            if cfg.logging.every and step % cfg.logging.every == 0:
                logger.log(step, agg.summary(lr=host.get("lr")))
            if consecutive_bad >= cfg.max_bad_steps:
                stopped_by = "nonfinite"
                break
            ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, data_state=data_iter)
            if guard.should_stop(step):
                ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, data_state=data_iter, force=True)
                stopped_by = "preempted"
                break
            if on_step is not None:
                on_step(step, host)
            if stop_after is not None and step - start >= stop_after:
                break
    if stopped_by == "done" and step == cfg.steps:
        ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, data_state=data_iter, force=True)
    ckpt.close()
    logger.close()
    if stopped_by == "nonfinite":
        raise DataError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (max_bad_steps="
                        f"{cfg.max_bad_steps}); stopped at step {step}. The last good checkpoint is in "
                        f"{cfg.checkpoint.dir}; check the data (data/bad metrics) or lower optim.lr.")
    bad = data_iter.bad.to_dict() if hasattr(data_iter, "bad") else {}
    return TrainResult(step=step, losses=losses, skipped_steps=skipped_total, stopped_by=stopped_by, bad_samples=bad)
