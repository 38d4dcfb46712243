"""The input pipeline owns the global batch of a multi-host run (MaxText's `multihost_dataloading`).

    data = build_batches(cfg, cfg.data.corpus, rows=process_rows(mesh, cfg.data.batch_size))
    it = data.iterator()                       # a Grain DatasetIterator: checkpointable
    batch = to_global(next(it), mesh)          # jax.Arrays of the whole global batch, sharded over the mesh

**Global batches.** Global batch k is the concatenation, in row order, of batch k of `S` data shards:
shard s is the Grain pipeline with `process_index=s, process_count=S` (the seeded global shuffle,
strided `[s::S]`) and batch size `B / S`, and it fills global rows `[s*B/S, (s+1)*B/S)`. A process reads
exactly the shards behind the rows that `make_array_from_process_local_data` places on its devices
(`process_rows`). Rows are self-contained (their audio indices are row-local), so shards are simply
concatenated. The global batch depends only on the seed, `B` and `S`, never on how many processes read
it: with the same `S`, one process and N processes train on the same rows in the same order (Levanter's
"same batches for any cluster size"). The default `S` is one shard per process-sized row block (one
pipeline per process, the cheapest); pass `data_shards=` a multiple of every process count you will use
(the batch size always works) to keep batches identical across cluster sizes. (A bad sample is replaced
by the next one of the same shard, so this holds with bad samples too.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import jax
import numpy as np

from alm_jax.config import TrainConfig
from alm_jax.data.bad_data import BadDataCounter
from alm_jax.data.corpus import Corpus
from alm_jax.data.pipeline import AudioSpec, PipelineConfig, SampleBuilder, caption_tokenizer, make_dataset
from alm_jax.data.templates import ChatTokenizer
from alm_jax.errors import ConfigError, DataError
from alm_jax.sharding import batch_sharding
from alm_jax.weights.hf_import import read_config


def sample_builder(cfg: TrainConfig, llm_dir: str) -> SampleBuilder:
    """Record -> sample for this run: the LLM's chat template, the connector's token rule, encoder 0's
    padding and mel bins (for `data.host_features`), and CLAP's caption tokenizer for a MATS run (text-only
    records)."""
    from transformers import AutoTokenizer
    tok = ChatTokenizer(AutoTokenizer.from_pretrained(llm_dir))
    n_mels = 80
    if cfg.data.host_features:   # the log-mel is computed here, so it needs encoder 0's mel bins
        n_mels = int(read_config(cfg.model.encoders[0].path).get("num_mel_bins", 80))
    return SampleBuilder(tok, AudioSpec.from_config(cfg), cfg.data.max_text_tokens, cfg.data.max_clips,
                         host_features=cfg.data.host_features, n_mels=n_mels, captions=caption_tokenizer(cfg))


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


class ProcessBatches(grain.DatasetIterator):
    """This process's rows of each global batch: the next batch of each of its data shards, concatenated.

    A Grain `DatasetIterator` (its state: every shard's state), so checkpoints restore it exactly; `bad`
    merges the shards' bad-sample counters."""

    def __init__(self, shard_iterators, layout: BatchLayout):
        super().__init__(list(shard_iterators))
        self.layout = layout

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._parents]
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts], 0) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shards": [it.get_state() for it in self._parents], "layout": dataclasses.asdict(self.layout)}

    def set_state(self, state: dict[str, Any]) -> None:
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
    def bad(self) -> BadDataCounter:
        total = BadDataCounter()
        for it in self._parents:
            total.merge(it.bad)
        return total


@dataclasses.dataclass
class ShardedData:
    """The shard pipelines this process reads; `iterator()` starts them from the beginning."""
    datasets: list
    layout: BatchLayout

    def iterator(self) -> ProcessBatches:
        return ProcessBatches([iter(ds) for ds in self.datasets], self.layout)


def build_batches(cfg: TrainConfig, llm_dir: str, corpora, *, rows: tuple[int, int], data_shards: int | None = None,
                  shuffle: bool = True, epochs: int | None | str = "config", batch_size: int | None = None,
                  what: str = "data.corpus", fraction: float | None = None) -> ShardedData:
    """The pipelines behind global rows `rows` of every global batch (see the module doc).
    epochs: passes over the corpus, None = repeat forever, "config" = `data.epochs`; batch_size: the
    global batch (default `data.batch_size`); fraction: the nested subset read (default `data.fraction` for
    the training corpus, all of any other, e.g. held-out data: a scaling study scores every point on the
    whole held-out set). `data.weights` mix the training corpora; any other corpora are mixed in proportion to
    their records, so one pass reads each of them whole."""
    if fraction is None:
        fraction = cfg.data.fraction if what == "data.corpus" else 1.0
    if epochs == "config":
        epochs = cfg.data.epochs or None
    if not corpora:
        raise ConfigError(f"{what} is empty; give one or more corpus directories (`alm demo` writes one "
                          "under runs/demo/corpus)")
    layout = BatchLayout.make(batch_size or cfg.data.batch_size, rows, data_shards)
    builder = sample_builder(cfg, llm_dir)
    # data.weights mix the training corpora; other corpora (held-out data) in proportion to their records
    weights = (cfg.data.weights or None) if what == "data.corpus" else [max(len(Corpus(c).source), 1)
                                                                          for c in corpora]
    datasets = []
    for s in layout.shards:
        pcfg = PipelineConfig(batch_size=layout.rows_per_shard, seq_len=cfg.data.max_text_tokens,
                              max_clips=cfg.data.max_clips, seed=cfg.data.seed, shuffle=shuffle, epochs=epochs,
                              fraction=fraction, num_workers=cfg.data.num_workers,
                              bad_fraction_limit=cfg.data.bad_fraction_limit, process_index=s,
                              process_count=layout.num_shards)
        sources = [Corpus(c).source for c in corpora]
        datasets.append(make_dataset(sources, builder, pcfg, weights=weights))
    return ShardedData(datasets, layout)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows -> global `jax.Array`s with the batch axis over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}
