"""The training loop, top to bottom: mesh -> model -> data -> optimizer -> restore -> steps -> evals -> save.

    summary = train(load_config("configs/demo.yaml", ["optim.lr=3e-4"]))

The step itself is pure (`training/step.py`); this loop owns every side effect: data, checkpoints
(with the data iterator's state, so a resumed run consumes exactly the batches the uninterrupted run
would have), metrics, held-out evals, preemption (SIGTERM/SIGINT -> checkpoint at the current step, clean
exit) and the non-finite guard (a step with a non-finite loss or gradient leaves the parameters and
optimizer state unchanged and is counted; K in a row stop the run with a `DataError`, and every checkpoint
on disk still holds good parameters, because a skipped step changes nothing).

**Global batches.** Global batch k is the concatenation, in row order, of batch k of `S` data shards:
shard s is the Grain pipeline with `process_index=s, process_count=S` (the seeded global shuffle,
strided `[s::S]`) and batch size `B / S`, and it fills global rows `[s*B/S, (s+1)*B/S)`. A process reads
exactly the shards behind the rows that `make_array_from_process_local_data` places on its devices
(`process_rows`), and the audio slot indices are offset to those global rows. So the global batch
depends only on the seed, `B` and `S`, never on how many processes read it: with the same `S`, one
process and N processes train on the same rows in the same order (Levanter's "same batches for any
cluster size"). The default `S` is one shard per process-sized row block (one pipeline per process, the
cheapest); pass `data_shards=` a multiple of every process count you will use (the batch size always
works) to keep batches identical across cluster sizes. (A bad sample is replaced by the next one of the
same shard, so this holds with bad samples too.)

**Metrics** (JSONL/TensorBoard from process 0, every `logging.every` steps): loss, grad_norm, lr,
tokens_per_s (loss tokens of the global batch), samples_per_s, step_time, data_wait, mfu, tflops_per_s,
skipped_steps, bad_samples_by_kind (samples dropped by process 0's shards); `eval/loss` every
`eval.every` steps: the token-mean loss over the first `eval.batches` batches of `eval.corpus`, read in
order by a pipeline that restarts at every eval, so each eval sees the same samples.

**FLOPs and MFU** (`training/flops.py` has the conventions): model FLOPs per step =
    1 x encoder forward (stop_gradient; layers up to the deepest tap, on every clip slot)
  + 3 x connector forward (trainable: forward + activation grads + weight grads)
  + 2 x LLM forward over the full text length (frozen, but gradients flow through it to the connector)
  + 3 x LoRA forward (trainable adapters inside the LLM),
with the encoder and LLM counted analytically from their configs and the connector's matmuls counted
from its traced program (any connector kind). MFU = FLOPs per step / step wall time / (devices x peak);
no peak on CPU, so MFU is None there (`tflops_per_s` is logged anyway).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    import grain
except ImportError:  # pragma: no cover - grain is a hard dependency of the data pipeline
    grain = None

from alm_jax.config import ModelConfig, TrainConfig, to_dict
from alm_jax.errors import ConfigError, DataError
from alm_jax.training.mesh import batch_sharding, make_mesh, state_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FUSION_KINDS = ("alarm_ca", "alarm_p", "sum")


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

    # The functional step carries params and optimizer state only: per-step mutable state (BatchNorm
    # running statistics, dropout RNG counters) would be silently frozen, so refuse it up front.
    if cfg.connector.norm == "batch" and cfg.connector.kind in ("alarm", "alarm_ca", "alarm_p", "sum"):
        raise ConfigError("model.connector.norm=batch is not supported in training yet (the train step does not "
                          "carry BatchNorm running statistics); use model.connector.norm=layer")
    if cfg.lora.rank > 0 and cfg.lora.dropout > 0:
        raise ConfigError("model.lora.dropout > 0 is not supported in training yet (the train step does not "
                          "advance dropout RNG state); set model.lora.dropout=0")
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


# ------------------------------------------------------------------------------------------- data


def _sample_builder(cfg: TrainConfig, model, llm_dir: str):
    from transformers import AutoTokenizer

    from alm_jax.data.pipeline import AudioSpec, SampleBuilder
    from alm_jax.data.templates import ChatTokenizer

    enc0 = cfg.model.encoders[0]
    buffer_seconds = enc0.pad_to_seconds or cfg.data.max_audio_seconds
    count = model.token_count
    audio = AudioSpec(tokens_for_samples=count, max_audio_tokens=count(int(buffer_seconds * 16000)),
                      pad_to_seconds=enc0.pad_to_seconds, max_seconds=cfg.data.max_audio_seconds)
    tok = ChatTokenizer(AutoTokenizer.from_pretrained(llm_dir))
    return SampleBuilder(tok, audio, cfg.data.max_text_tokens, cfg.data.max_clips)


def _shard_dataset(cfg: TrainConfig, builder, corpora, *, batch_size: int, shard: int, num_shards: int,
                   shuffle: bool, epochs, seed_offset: int):
    from alm_jax.data.corpus import Corpus
    from alm_jax.data.pipeline import PipelineConfig, make_dataset

    pcfg = PipelineConfig(batch_size=batch_size, seq_len=cfg.data.max_text_tokens,
                          max_clips=cfg.data.max_clips, seed=cfg.data.seed + seed_offset, shuffle=shuffle,
                          epochs=epochs,
                          fraction=cfg.data.fraction, num_workers=cfg.data.num_workers,
                          bad_fraction_limit=cfg.data.bad_fraction_limit,
                          process_index=shard, process_count=num_shards)
    sources = [Corpus(c).source for c in corpora]
    return make_dataset(sources, builder, pcfg, weights=cfg.data.weights or None)


def build_dataset(cfg: TrainConfig, model, llm_dir: str, corpora, *, shuffle=True, epochs=None, seed_offset=0):
    """The Grain pipeline for this process alone (one shard per process, `B / process_count` rows); the
    trainer itself uses `build_batches`, which also fixes the audio slots for the global batch."""
    if not corpora:
        raise ConfigError("data.corpus is empty; give one or more corpus directories (alm prepare / alm demo "
                          "writes one)")
    pc = jax.process_count()
    if cfg.data.batch_size % pc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {pc} processes")
    return _shard_dataset(cfg, _sample_builder(cfg, model, llm_dir), corpora, batch_size=cfg.data.batch_size // pc,
                          shard=jax.process_index(), num_shards=pc, shuffle=shuffle,
                          epochs=epochs if epochs is not None else (cfg.data.epochs or None), seed_offset=seed_offset)


def process_rows(mesh, global_batch: int) -> tuple[int, int]:
    """`[start, stop)`: the rows of a global batch that `make_array_from_process_local_data` takes from
    this process (those on its devices under `batch_sharding`). All rows when the batch is replicated
    across processes."""
    n = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if global_batch % n:
        raise ConfigError(f"data.batch_size={global_batch} is not divisible by mesh.data * mesh.fsdp = {n} "
                          "(the batch is split over those axes)")
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index.values()})
    start, stop = spans[0]
    for a, b in spans[1:]:
        if a > stop:
            raise ConfigError(f"this process's devices hold non-contiguous rows of the batch ({spans}); "
                              "order the mesh so each process's devices are adjacent along data/fsdp")
        stop = max(stop, b)
    return start, stop


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which data shards make up the global batch, and which of them this process reads."""
    global_batch: int
    num_shards: int
    row_start: int          # this process's rows of the global batch: [row_start, row_stop)
    row_stop: int

    @property
    def rows_per_shard(self) -> int:
        return self.global_batch // self.num_shards

    @property
    def shards(self) -> range:
        return range(self.row_start // self.rows_per_shard, self.row_stop // self.rows_per_shard)

    @classmethod
    def make(cls, global_batch: int, rows: tuple[int, int], data_shards: int | None = None) -> "BatchLayout":
        start, stop = rows
        shards = data_shards or global_batch // (stop - start)
        if shards <= 0 or global_batch % shards:
            raise ConfigError(f"data_shards={shards} must be a positive divisor of data.batch_size={global_batch}")
        per = global_batch // shards
        if start % per or stop % per:
            raise ConfigError(f"data_shards={shards} ({per} rows each) does not line up with this process's rows "
                              f"[{start}, {stop}) of the global batch of {global_batch}; use a multiple of the "
                              "number of processes that divides the batch size")
        return cls(global_batch, shards, start, stop)


class ProcessBatches(grain.DatasetIterator if grain is not None else object):
    """This process's rows of each global batch: the next batch of each of its data shards, concatenated,
    with `audio_slot` rewritten from shard-local to global rows (`(row * C + clip) * M + pos`, M = max
    audio tokens per clip), because the model indexes the audio tokens of the whole global batch.

    A Grain `DatasetIterator` (its state: every shard's state), so checkpoints restore it exactly; `bad`
    merges the shards' bad-sample counters."""

    def __init__(self, shard_iterators, layout: BatchLayout, max_audio_tokens: int):
        super().__init__(list(shard_iterators))
        self.layout, self.max_audio_tokens = layout, max_audio_tokens

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._parents]
        out = {k: np.concatenate([p[k] for p in parts], 0) for k in parts[0] if k != "audio_slot"}
        slots, row = [], self.layout.row_start
        for p in parts:
            b = p["input_ids"].shape[0]
            clips = p["audio_samples"].shape[0] // b
            offset = row * clips * self.max_audio_tokens
            slots.append(np.where(p["audio_slot"] >= 0, p["audio_slot"] + offset, -1).astype(np.int32))
            row += b
        out["audio_slot"] = np.concatenate(slots, 0)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"shards": [it.get_state() for it in self._parents], "layout": dataclasses.asdict(self.layout)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "shards" not in state and len(self._parents) == 1:   # a checkpoint from before data shards
            self._parents[0].set_state(state)
            return
        saved = state.get("layout", {})
        if saved and (saved.get("num_shards"), saved.get("global_batch")) != (self.layout.num_shards,
                                                                               self.layout.global_batch):
            raise DataError(f"the checkpoint's data iterator has {saved.get('num_shards')} data shards of a "
                            f"batch of {saved.get('global_batch')}, this run {self.layout.num_shards} of "
                            f"{self.layout.global_batch}; resume with the same data.batch_size and data_shards")
        if len(state["shards"]) != len(self._parents):
            raise DataError(f"the checkpoint's data state holds {len(state['shards'])} shards for this process, "
                            f"this run reads {len(self._parents)}; resume with the same process count and shards")
        for it, s in zip(self._parents, state["shards"]):
            it.set_state(s)

    @property
    def bad(self):
        from alm_jax.data.bad_data import BadDataCounter
        total = BadDataCounter()
        for it in self._parents:
            if hasattr(it, "bad"):
                total.merge(it.bad)
        return total


@dataclasses.dataclass
class ShardedData:
    """The shard pipelines this process reads; `iterator()` starts them from the beginning."""
    datasets: list
    layout: BatchLayout
    max_audio_tokens: int

    def iterator(self) -> ProcessBatches:
        return ProcessBatches([iter(ds) for ds in self.datasets], self.layout, self.max_audio_tokens)


def build_batches(cfg: TrainConfig, model, llm_dir: str, corpora, *, rows: tuple[int, int],
                  data_shards: int | None = None, shuffle: bool = True, epochs: int | None | str = "config",
                  seed_offset: int = 0, what: str = "data.corpus") -> ShardedData:
    """The pipelines behind global rows `rows` of every batch of `cfg.data.batch_size` (see the module doc).
    epochs: passes over the corpus, None = repeat forever, "config" = `data.epochs`."""
    if epochs == "config":
        epochs = cfg.data.epochs or None
    if not corpora:
        raise ConfigError(f"{what} is empty; give one or more corpus directories (alm prepare / alm demo "
                          "writes one)")
    layout = BatchLayout.make(cfg.data.batch_size, rows, data_shards)
    builder = _sample_builder(cfg, model, llm_dir)
    datasets = [_shard_dataset(cfg, builder, corpora, batch_size=layout.rows_per_shard, shard=s,
                               num_shards=layout.num_shards, shuffle=shuffle, epochs=epochs, seed_offset=seed_offset)
                for s in layout.shards]
    return ShardedData(datasets, layout, builder.audio.max_audio_tokens)


def _global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def _want_sync(cfg: TrainConfig) -> bool:
    if cfg.sync_every_step != "auto":
        return cfg.sync_every_step == "on"
    return jax.devices()[0].platform == "cpu" and jax.device_count() > 1


def place_on_mesh(tree, mesh):
    """Leaves not yet laid out on `mesh` (e.g. the optimizer's step counters, which `tx.init` creates
    on one device) become replicated on it, so the step sees the same input shardings at every call
    (otherwise its second call compiles again). Works multi-process: built from each process's copy."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    rep = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])
    return jax.tree.map(one, tree)


def _host_scalars(tree: dict) -> dict[str, float]:
    """Replicated scalar outputs -> Python floats (reads this process's copy: works multi-process)."""
    return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)) for k, v in tree.items()}


# ------------------------------------------------------------------------------------------- FLOPs


def matmul_flops(jaxpr) -> int:
    """FLOPs of every `dot_general` (2 * output size * contracted size) and convolution in a (closed)
    jaxpr, nested calls included (a scan's body counts `length` times)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            per_out = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])   # in channels (per group) x kernel
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in _sub_jaxprs(eqn.params):
            total += times * matmul_flops(sub)
    return total


def _sub_jaxprs(params):
    """The (closed) jaxprs among an equation's parameters (pjit, scan, cond branches, custom_vjp, remat)."""
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                yield v


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _encoder_layers_run(model, i: int) -> int:
    """Blocks of encoder i that the model uses: up to its deepest tap (XLA drops the rest); MATS pools
    the last entry, so all of them."""
    n = model.encoders[i].config.encoder_layers
    if model.kind == "mats" and i == 0:
        return n
    blocks = model.encoder_cfgs[i].tap_indexing == "blocks"
    return max(t + 1 if blocks else t for t in model.taps[i])


def step_flops(model, sample: dict[str, Any], batch_size: int) -> dict[str, int]:
    """Trainable-aware model FLOPs of one training step of `batch_size` samples shaped like `sample` (one
    sample's batch: arrays or `jax.ShapeDtypeStruct`s, leading axis 1 for text keys and C clips for audio
    keys). Returns the forward FLOPs of the whole batch by part, `{'encoder', 'connector', 'llm', 'lora'}`,
    and `'train'`, the step total with the multipliers of `flops.alm_train_flops` (see the module doc).

    Encoder and LLM are counted from their configs (`training/flops.py`). The connector (any kind) is
    what remains of the matmul FLOPs of the traced forward after the encoders, the log-mel filterbank
    and the LLM (all traced alone, on the same shapes) are taken out."""
    from alm_jax.audio.features import log_mel
    from alm_jax.models.lora import lora_layers
    from alm_jax.training import flops as F

    graphdef, state = nnx.split(model)
    params = _abstract(state)
    sample = _abstract(dict(sample))
    clips = sample["audio_samples"].shape[0]
    text_len = sample["input_ids"].shape[1]
    trace = lambda f, *args: matmul_flops(jax.make_jaxpr(f)(params, *args))   # noqa: E731
    used = range(len(model.encoders)) if model.kind in FUSION_KINDS else range(1)

    encoder = taken = 0
    for i in used:
        c, ecfg = model.encoders[i].config, model.encoder_cfgs[i]
        if "audio_features" in sample:
            feats = sample["audio_features"]
        else:
            def mel(st, a, c=c, e=ecfg):
                return log_mel(a, n_mels=c.num_mel_bins, pad_to_seconds=e.pad_to_seconds)
            feats = jax.eval_shape(mel, params, sample["audio"])
            taken += trace(mel, sample["audio"])
        feats = jax.ShapeDtypeStruct(feats.shape, model.encoders[i].dtype)
        taken += trace(lambda st, x, i=i: nnx.merge(graphdef, st).encoders[i](x), feats)
        frames = -(-feats.shape[2] // 2)
        encoder += F.encoder_forward_flops(_encoder_layers_run(model, i), c.d_model, c.encoder_ffn_dim,
                                           c.encoder_attention_heads, c.num_mel_bins, frames)
    lc = model.llm.cfg
    embeds = jax.ShapeDtypeStruct((1, text_len, lc.hidden_size), model.dtype)
    mask = sample.get("attention_mask")
    taken += trace(lambda st, e, m: nnx.merge(graphdef, st).llm(inputs_embeds=e, attention_mask=m), embeds, mask)
    connector = trace(lambda st, b: nnx.merge(graphdef, st)(b), sample) - taken
    llm = F.transformer_forward_flops(lc.num_layers, lc.hidden_size, lc.intermediate_size, lc.num_heads,
                                      lc.num_kv_heads, lc.head_dim, text_len, lc.vocab_size)
    lora = sum(F.lora_forward_flops(text_len, [(l.base.in_features, l.base.out_features)], l.rank)
               for _, l in lora_layers(model.llm))
    out = {"encoder": batch_size * encoder, "connector": batch_size * connector, "llm": batch_size * llm,
           "lora": batch_size * lora}
    out["train"] = F.alm_train_flops(out["encoder"], out["connector"], out["llm"], lora_fwd=out["lora"])
    return out


def one_sample(batch: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one sample of a pipeline batch (every leading axis divided by the batch size)."""
    b = batch["input_ids"].shape[0]
    return {k: jax.ShapeDtypeStruct((v.shape[0] // b, *v.shape[1:]), v.dtype) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    losses: dict[int, float]        # step (1-based) -> loss, for the steps this run executed
    skipped_steps: int
    stopped_by: str                 # "done" | "preempted" | "nonfinite"
    bad_samples: dict
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)   # step -> held-out loss
    flops_per_step: int | None = None


def _check_eval(cfg: TrainConfig) -> None:
    ev = cfg.eval
    if ev.every < 0:
        raise ConfigError(f"eval.every={ev.every} must be >= 0 (0 = no evals)")
    if ev.every > 0 and ev.batches < 1:
        raise ConfigError(f"eval.batches={ev.batches} must be >= 1 when eval.every={ev.every}")
    if ev.every > 0 and not ev.corpus:
        raise ConfigError(f"eval.corpus is empty but eval.every={ev.every}; give held-out corpus directories "
                          "(eval.corpus=[dir, ...]) or set eval.every=0")


def train(cfg: TrainConfig, *, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          batch_transform: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
          data_shards: int | None = None) -> TrainResult:
    """Runs (or resumes) training as configured.

    stop_after: return after that many steps of this call (tests). on_step(step, metrics): called after
    every step with host values (plus `eval/loss` at eval steps). batch_transform(step, batch): a test
    hook that sees (and may replace) this process's numpy rows of the batch for 1-based `step` before they
    go to the devices, e.g. to inject a non-finite batch. data_shards: the number of data shards `S` of
    the global batch (module doc); None = `data.shards` (0 = one per process)."""
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.checkpoint import Checkpointer, PreemptionGuard, abstract_with_shardings, resolve_resume
    from alm_jax.training.flops import peak_flops_per_device
    from alm_jax.training.metrics import MetricsAggregator, MetricsLogger, StepTimer
    from alm_jax.training.step import build_eval_step, build_train_step, make_optimizer, make_schedule

    _check_eval(cfg)
    if not cfg.data.corpus:
        raise ConfigError("data.corpus is empty; give one or more corpus directories (alm prepare / alm demo "
                          "writes one)")
    # ---- mesh and model
    mesh = make_mesh(cfg.mesh.data * cfg.mesh.dcn_data if cfg.mesh.data != -1 else -1, cfg.mesh.fsdp, cfg.mesh.tensor)
    rows = process_rows(mesh, cfg.data.batch_size)
    model, llm_dir = build_model(cfg.model, mesh=mesh, seed=cfg.seed)
    graphdef, trainable, frozen = split_trainable(model)
    trainable = jax.device_put(trainable, state_shardings(trainable, mesh))
    sched = make_schedule(cfg.optim)
    tx = make_optimizer(cfg.optim)
    opt_state = place_on_mesh(jax.jit(tx.init)(trainable), mesh)
    step_fn = build_train_step(graphdef, tx, alm_loss, grad_accum=cfg.optim.grad_accum, schedule=sched)

    # ---- data
    if data_shards is None:
        data_shards = cfg.data.shards or None
    data = build_batches(cfg, model, llm_dir, cfg.data.corpus, rows=rows, data_shards=data_shards)
    data_iter = data.iterator()
    eval_data = eval_fn = None
    if cfg.eval.every > 0:
        eval_data = build_batches(cfg, model, llm_dir, cfg.eval.corpus, rows=rows, data_shards=data_shards,
                                  shuffle=False, epochs=None, what="eval.corpus")   # repeats: any size works
        eval_fn = build_eval_step(graphdef, alm_loss)
    del model   # its arrays live on in (trainable, frozen)

    # ---- restore
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_config=to_dict(cfg))
    start = 0
    point = resolve_resume(cfg.resume, cfg.checkpoint.dir)
    if point is None and ckpt.all_steps():
        raise ConfigError(f"checkpoint.dir {cfg.checkpoint.dir} already holds checkpoints {ckpt.all_steps()} from "
                          "an earlier run, and resume=none would not overwrite them; continue with resume=auto, "
                          "or give a new checkpoint.dir (or remove the old one)")
    if point is not None:
        target = {"trainable": trainable, "opt_state": opt_state}
        abstract = abstract_with_shardings(target)
        reader = ckpt if Path(point.directory).absolute() == ckpt.directory else Checkpointer(point.directory, read_only=True)
        state, _ = reader.restore(point.step, abstract, data_iterator=data_iter)
        trainable, opt_state = state["trainable"], state["opt_state"]
        start = point.step

    sync = _want_sync(cfg)

    def run_eval() -> float:
        """Token-mean loss over the first `eval.batches` batches of the held-out pipeline (restarted)."""
        it = eval_data.iterator()
        loss_sum = tokens = 0.0
        for _ in range(cfg.eval.batches):
            out = _host_scalars(eval_fn(trainable, frozen, _global_batch(next(it), mesh)))  # waits: no pile-up
            loss_sum, tokens = loss_sum + out["loss_sum"], tokens + out["tokens"]
        it.close()
        return loss_sum / max(tokens, 1.0)

    logger = MetricsLogger.from_config(cfg.logging, total_steps=cfg.steps, process_index=jax.process_index())
    flops_per_step: int | None = None
    agg: MetricsAggregator | None = None
    timer = StepTimer()
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    consecutive_bad = skipped_total = 0
    stopped_by = "done"
    last_bad = {}
    step = start
    with PreemptionGuard() as guard:
        while step < cfg.steps:
            batch = timer.fetch(data_iter)
            if agg is None:   # FLOPs need the batch shapes: count them once, at the first batch
                flops_per_step = step_flops(nnx.merge(graphdef, trainable, frozen), one_sample(batch),
                                            cfg.data.batch_size)["train"]
                agg = MetricsAggregator(flops_per_step=flops_per_step, num_devices=jax.device_count(),
                                        peak_flops_per_device=peak_flops_per_device())
            if batch_transform is not None:
                batch = batch_transform(step + 1, batch)
            with timer.step():
                trainable, opt_state, m = step_fn(trainable, opt_state, frozen, _global_batch(batch, mesh), step)
                if sync:
                    m["loss"].block_until_ready()
            step += 1
            host = _host_scalars(m)
            losses[step] = host["loss"]
            skipped = host["skipped"] > 0
            skipped_total += int(skipped)
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            bad_now = data_iter.bad.to_dict()["bad"]
            new_bad = {k: v - last_bad.get(k, 0) for k, v in bad_now.items() if v - last_bad.get(k, 0)}
            last_bad = bad_now
            agg.add(loss=host["loss"], tokens=int(host["tokens"]), samples=cfg.data.batch_size,
                    step_time=timer.last_step, data_wait=timer.last_data_wait, grad_norm=host["grad_norm"],
                    skipped=skipped, bad_samples=new_bad)
            row: dict[str, Any] = {}
            if eval_fn is not None and step % cfg.eval.every == 0:
                host["eval/loss"] = eval_losses[step] = row["eval/loss"] = run_eval()
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
    last = ckpt.latest_step()
    ckpt.close()
    logger.close()
    if stopped_by == "nonfinite":
        raise DataError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (max_bad_steps="
                        f"{cfg.max_bad_steps}); stopped at step {step}. The last good checkpoint is "
                        f"{'step ' + str(last) if last is not None else 'none'} in {cfg.checkpoint.dir} (skipped "
                        "steps do not change the parameters); check the data (bad_samples_by_kind, the batches "
                        "of those steps) or lower optim.lr, then resume.")
    bad = data_iter.bad.to_dict()
    return TrainResult(step=step, losses=losses, skipped_steps=skipped_total, stopped_by=stopped_by, bad_samples=bad,
                       eval_losses=eval_losses, flops_per_step=flops_per_step)
