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

from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    name: str

    def run(self, model) -> dict[str, float]:
        """Metrics of `model` (an `AudioLanguageModel`), keyed `"<prefix><metric>"`."""
        ...


class GenerationSuite:
    """Shared by the suites that generate answers: built from `(cfg, SuiteConfig)`; `details` (the last run's
    per-item answers and report) and `progress` (a `(done, total)` callback) for `alm eval`. `takes_mesh`:
    the constructor also takes the run's mesh (suites that load a copy of the backbone)."""
    details: dict[str, Any] | None = None
    progress: Callable[[int, int], None] | None = None
    takes_mesh = False

    @classmethod
    def build(cls, cfg, suite, *, data_shards: int | None = None, mesh=None, prefix: str = "eval/"):
        return cls(cfg, suite, prefix=prefix, **({"mesh": mesh} if cls.takes_mesh else {}))
