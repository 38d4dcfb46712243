"""The evaluator interface (big_vision's `evaluators/`): built from config, run on a model.

    evaluators = build_evaluators(cfg)                  # alm_jax.evaluation
    metrics = evaluators[0].run(model)                  # {"eval/loss": 2.65}

The trainer calls every evaluator it was given each `eval.every` steps (`train(cfg, evaluators=...)`;
`alm train` builds them from the config), `alm eval` runs them on restored checkpoint weights, and the
demo uses them before and after training. An evaluator owns its data and its jitted program; `run`
must not change the model. Metric values are Python floats (the trainer logs them to JSONL/TensorBoard).

Each registered class is built by `Cls.build(cfg, suite, *, data_shards=None, mesh=None)` (`suite`: its
`eval.suites` entry, `config.SuiteConfig`). Generating suites also have `progress` (an optional
`(done, total)` callback, set by `alm eval`) and `details` (the last run's per-item answers and report,
written by `alm eval --out`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    name: str

    def run(self, model) -> dict[str, float]:
        """Metrics of `model` (an `AudioLanguageModel`), keyed `"<prefix><metric>"`."""
        ...
