"""Held-out loss: the token-mean cross-entropy over held-out corpus batches.

Read in order by a pipeline that restarts at every `run`, so each run sees the same samples (a resumed
run's evals equal the uninterrupted run's). `batches=0` reads the corpora once to the end (`batch_size=1`
counts every record).
"""

from __future__ import annotations

from typing import Sequence

from alm_jax.config import TrainConfig
from alm_jax.data.multihost import build_batches, process_rows, to_global
from alm_jax.errors import DataError
from alm_jax.models.alm import split_trainable
from alm_jax.sharding import host_scalars, mesh_from_config
from alm_jax.training.step import alm_loss, build_eval_step


class HeldOutLoss:
    """`run(model) -> {prefix + "loss": token-mean loss}` over the first `batches` global batches of
    `corpora` (0 = all of them once), on the run's mesh and data shards."""
    name = "loss"

    def __init__(self, cfg: TrainConfig, corpora: Sequence[str], *, batches: int, batch_size: int | None = None,
                 data_shards: int | None = None, mesh=None, prefix: str = "eval/"):
        self.mesh = mesh if mesh is not None else mesh_from_config(cfg.mesh)
        self.batches, self.prefix = batches, prefix
        batch_size = batch_size or cfg.data.batch_size
        self.data = build_batches(cfg, cfg.model.llm, list(corpora), rows=process_rows(self.mesh, batch_size),
                                  data_shards=data_shards, shuffle=False, epochs=1 if batches == 0 else None,
                                  batch_size=batch_size, what="eval.corpus")
        self._graphdef = self._step = None

    @classmethod
    def build(cls, cfg: TrainConfig, suite=None, *, data_shards: int | None = None, mesh=None,
              prefix: str = "eval/") -> "HeldOutLoss":
        """From the run config: `eval.corpus`, `eval.batches` (the suite settings are not used)."""
        return cls(cfg, cfg.eval.corpus, batches=cfg.eval.batches, data_shards=data_shards, mesh=mesh, prefix=prefix)

    def run(self, model) -> dict[str, float]:
        graphdef, trainable, frozen = split_trainable(model)
        if self._step is None or graphdef != self._graphdef:
            self._graphdef, self._step = graphdef, build_eval_step(graphdef, alm_loss)
        it = self.data.iterator()
        loss_sum = tokens = 0.0
        done = 0
        while self.batches == 0 or done < self.batches:
            try:
                batch = next(it)
            except StopIteration:
                break
            out = host_scalars(self._step(trainable, frozen, to_global(batch, self.mesh)))  # waits: no pile-up
            loss_sum, tokens, done = loss_sum + out["loss_sum"], tokens + out["tokens"], done + 1
        bad = it.bad.to_dict()
        it.close()
        if tokens == 0:
            raise DataError(f"no held-out loss token in {done} batches of the eval corpus (bad samples: "
                            f"{bad.get('bad', {})}); check eval.corpus")
        return {f"{self.prefix}loss": loss_sum / tokens}
