"""Held-out loss: the token-mean cross-entropy over held-out corpus batches.

Read in order by a pipeline that restarts at every `run`, so each run sees the same samples (a resumed
run's evals equal the uninterrupted run's). `batches=0` reads the corpora once to the end (`batch_size=1`
counts every record).

The listening gap (`listening_gap=True`) scores every batch a second time with each sample's audio taken
from the next sample of the batch (the last takes the first's): `eval/loss_other_audio` - `eval/loss` is
how much the model's targets depend on hearing their own clip. A model that ignores its audio scores a gap
of ~0; it is teacher-forced, so it costs two forward passes per batch and no decoding. Only the connector's
input moves: DeSTA transcript tokens are text positions of the prompt and stay with their sample.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from alm_jax.config import TrainConfig
from alm_jax.data.multihost import build_batches, process_rows, to_global
from alm_jax.errors import ConfigError, DataError
from alm_jax.models.alm import split_trainable
from alm_jax.sharding import host_scalars, mesh_from_config
from alm_jax.training.step import alm_loss, build_eval_step


# per-clip batch entries `[B * C, ...]`: waveforms or log-mel, valid samples, MATS caption tokens
AUDIO_KEYS = ("audio", "audio_features", "audio_samples", "caption_ids", "caption_mask")


def other_audio(batch: dict) -> dict:
    """The batch with sample b's clips replaced by sample (b + 1) mod B's: every `AUDIO_KEYS` entry `[B * C, ...]`
    rolled by C rows (C clip slots per sample; a slot that is empty in the next sample becomes empty)."""
    out = dict(batch)
    rows = batch["input_ids"].shape[0]
    for key in AUDIO_KEYS:
        if key in batch:
            x = batch[key]
            per = x.shape[0] // rows
            out[key] = jnp.roll(x, -per, axis=0)
    return out


def other_audio_loss(model, batch):
    """`alm_loss` on `other_audio(batch)` (a `LossFn`)."""
    return alm_loss(model, other_audio(batch))


class HeldOutLoss:
    """`run(model) -> {prefix + "loss": token-mean loss}` over the first `batches` global batches of
    `corpora` (0 = all of them once), on the run's mesh and data shards; with `listening_gap`, also
    `loss_other_audio` and `listening_gap` (= loss_other_audio - loss; needs batches of 2 or more samples)."""
    name = "loss"

    def __init__(self, cfg: TrainConfig, corpora: Sequence[str], *, batches: int, batch_size: int | None = None,
                 data_shards: int | None = None, mesh=None, prefix: str = "eval/", listening_gap: bool = False):
        self.mesh = mesh if mesh is not None else mesh_from_config(cfg.mesh)
        self.batches, self.prefix, self.listening_gap = batches, prefix, listening_gap
        batch_size = batch_size or cfg.data.batch_size
        self.data = build_batches(cfg, cfg.model.llm, list(corpora), rows=process_rows(self.mesh, batch_size),
                                  data_shards=data_shards, shuffle=False, epochs=1 if batches == 0 else None,
                                  batch_size=batch_size, what="eval.corpus")
        if listening_gap and (batch_size or 0) < 2:
            raise ConfigError(f"eval.listening_gap swaps audio between the samples of a batch; batch size {batch_size} "
                              "has nothing to swap with: use 2 or more (data.batch_size / --batch-size)")
        self._graphdef = self._step = self._other_step = None

    @classmethod
    def build(cls, cfg: TrainConfig, suite=None, *, data_shards: int | None = None, mesh=None,
              prefix: str = "eval/") -> "HeldOutLoss":
        """From the run config: `eval.corpus`, `eval.batches` (the suite settings are not used)."""
        return cls(cfg, cfg.eval.corpus, batches=cfg.eval.batches, data_shards=data_shards, mesh=mesh, prefix=prefix,
                   listening_gap=cfg.eval.listening_gap)

    def run(self, model) -> dict[str, float]:
        graphdef, trainable, frozen = split_trainable(model)
        if self._step is None or graphdef != self._graphdef:
            self._graphdef, self._step = graphdef, build_eval_step(graphdef, alm_loss)
            self._other_step = build_eval_step(graphdef, other_audio_loss) if self.listening_gap else None
        it = self.data.iterator()
        loss_sum = tokens = other_sum = 0.0
        done = 0
        while self.batches == 0 or done < self.batches:
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = to_global(batch, self.mesh)
            out = host_scalars(self._step(trainable, frozen, batch))  # waits: no pile-up
            loss_sum, tokens, done = loss_sum + out["loss_sum"], tokens + out["tokens"], done + 1
            if self._other_step is not None:
                other_sum += host_scalars(self._other_step(trainable, frozen, batch))["loss_sum"]
        bad = it.bad.to_dict()
        it.close()
        if tokens == 0:
            raise DataError(f"no held-out loss token in {done} batches of the eval corpus (bad samples: "
                            f"{bad.get('bad', {})}); check eval.corpus")
        out = {f"{self.prefix}loss": loss_sum / tokens}
        if self.listening_gap:
            out[f"{self.prefix}loss_other_audio"] = other_sum / tokens
            out[f"{self.prefix}listening_gap"] = (other_sum - loss_sum) / tokens
        return out
