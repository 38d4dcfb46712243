"""Evaluation: evaluators built from config (see `base.Evaluator`), used by the trainer, `alm eval` and
the demo. Adding one = a module with a class that has `name`, `run(model)` and a classmethod
`build(cfg, suite, *, data_shards=, mesh=)`, plus one line in `EVALUATORS`.

- `loss`: `HeldOutLoss`, the token-mean loss on held-out corpora (`eval.corpus`, `eval.batches`).
- `mmau`, `mmsu`, `mmar`: multiple-choice benchmarks from local files, scored by their official rules
  (`benchmarks`, `multiple_choice`; `alm eval score` scores a predictions file without a model).
- `hallucination`: BALSa-style balanced yes/no questions on present / absent sounds of held-out demo clips.
- `forgetting`: text-only answers of the ALM vs its frozen backbone, plus code-checked instructions.
- `multi_audio`: MAE-style closed-form questions over two demo clips.
- `alignment`: the ALM from audio vs its backbone from the seed description on a closed-form question, with
  the no-audio baseline (`backbone.py` holds the shared backbone reference).

Suites other than `loss` read their settings from the `eval.suites` entry with their name
(`alm_jax.config.SuiteConfig`; defaults when there is none).
"""

from __future__ import annotations

from alm_jax.config import EvalConfig, SuiteConfig, TrainConfig
from alm_jax.errors import ConfigError
from alm_jax.evaluation.alignment import AlignmentSuite
from alm_jax.evaluation.base import Evaluator
from alm_jax.evaluation.benchmarks import MMARSuite, MMAUSuite, MMSUSuite, MultipleChoiceSuite
from alm_jax.evaluation.forgetting import ForgettingSuite
from alm_jax.evaluation.hallucination import HallucinationSuite
from alm_jax.evaluation.loss import HeldOutLoss
from alm_jax.evaluation.multi_audio import MultiAudioSuite

EVALUATORS = {"loss": HeldOutLoss, "mmau": MMAUSuite, "mmsu": MMSUSuite, "mmar": MMARSuite,
              "hallucination": HallucinationSuite, "forgetting": ForgettingSuite, "multi_audio": MultiAudioSuite,
              "alignment": AlignmentSuite}


def suite_config(ev: EvalConfig, name: str) -> SuiteConfig:
    """The `eval.suites` entry named `name`, or the defaults for it."""
    found = [s for s in ev.suites if s.name == name]
    return found[0] if found else SuiteConfig(name=name)


def check_suites(ev: EvalConfig) -> None:
    """Every `eval.suites` entry names a known suite, once."""
    names = [s.name for s in ev.suites]
    for i, n in enumerate(names):
        if n not in EVALUATORS or n == "loss":
            raise ConfigError(f"eval.suites.{i}.name={n!r}; choose one of {sorted(set(EVALUATORS) - {'loss'})} "
                              "(the loss evaluator is set by eval.corpus and eval.batches)")
        if names.count(n) > 1:
            raise ConfigError(f"eval.suites names {n!r} twice; give each suite one entry")


def build_evaluators(cfg: TrainConfig, *, data_shards: int | None = None, mesh=None) -> list[Evaluator]:
    """The evaluators `cfg.eval` asks for (`eval.evaluators`; `loss` on `eval.corpus`, the others with their
    `eval.suites` settings), or [] when `eval.every` is 0."""
    ev = cfg.eval
    if ev.every < 0:
        raise ConfigError(f"eval.every={ev.every} must be >= 0 (0 = no evals)")
    if ev.every == 0:
        return []
    unknown = [n for n in ev.evaluators if n not in EVALUATORS]
    if unknown:
        raise ConfigError(f"eval.evaluators: unknown {unknown}; choose from {sorted(EVALUATORS)}")
    check_suites(ev)
    unused = [s.name for s in ev.suites if s.name not in ev.evaluators]
    if unused:
        raise ConfigError(f"eval.suites configures {unused} but eval.evaluators={list(ev.evaluators)} does not run "
                          "them; add them to eval.evaluators (or drop their eval.suites entries)")
    if "loss" in ev.evaluators:
        if ev.batches < 1:
            raise ConfigError(f"eval.batches={ev.batches} must be >= 1 when eval.every={ev.every}")
        if not ev.corpus:
            raise ConfigError(f"eval.corpus is empty but eval.every={ev.every}; give held-out corpus directories "
                              "(eval.corpus=[dir, ...]) or set eval.every=0 (or drop `loss` from eval.evaluators)")
    if data_shards is None:
        data_shards = cfg.data.shards or None
    return [EVALUATORS[n].build(cfg, suite_config(ev, n), data_shards=data_shards, mesh=mesh) for n in ev.evaluators]


__all__ = ["AlignmentSuite", "EVALUATORS", "Evaluator", "ForgettingSuite", "HallucinationSuite", "HeldOutLoss", "MMARSuite", "MMAUSuite", "MMSUSuite", "MultiAudioSuite", "MultipleChoiceSuite",
           "build_evaluators", "check_suites", "suite_config"]
