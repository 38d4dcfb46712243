"""Evaluation: evaluators built from config (see `base.Evaluator`), used by the trainer, `alm eval` and
the demo. Adding one = a module with a class that has `name` and `run(model)`, plus one line in
`EVALUATORS`.

- `loss`: `HeldOutLoss`, the token-mean loss on held-out corpora.
"""

from __future__ import annotations

from alm_jax.config import TrainConfig
from alm_jax.errors import ConfigError
from alm_jax.evaluation.base import Evaluator
from alm_jax.evaluation.loss import HeldOutLoss

EVALUATORS = {"loss": HeldOutLoss}


def build_evaluators(cfg: TrainConfig, *, data_shards: int | None = None, mesh=None) -> list[Evaluator]:
    """The evaluators `cfg.eval` asks for (`eval.evaluators`, on `eval.corpus`), or [] when `eval.every` is 0."""
    ev = cfg.eval
    if ev.every < 0:
        raise ConfigError(f"eval.every={ev.every} must be >= 0 (0 = no evals)")
    if ev.every == 0:
        return []
    if ev.batches < 1:
        raise ConfigError(f"eval.batches={ev.batches} must be >= 1 when eval.every={ev.every}")
    if not ev.corpus:
        raise ConfigError(f"eval.corpus is empty but eval.every={ev.every}; give held-out corpus directories "
                          "(eval.corpus=[dir, ...]) or set eval.every=0")
    unknown = [n for n in ev.evaluators if n not in EVALUATORS]
    if unknown:
        raise ConfigError(f"eval.evaluators: unknown {unknown}; choose from {sorted(EVALUATORS)}")
    if data_shards is None:
        data_shards = cfg.data.shards or None
    return [EVALUATORS[n](cfg, ev.corpus, batches=ev.batches, data_shards=data_shards, mesh=mesh)
            for n in ev.evaluators]


__all__ = ["EVALUATORS", "Evaluator", "HeldOutLoss", "build_evaluators"]
