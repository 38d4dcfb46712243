"""The divergence guard: a loss, gradient-norm or parameter-norm spike relative to a running median stops
the run before a diverged state is kept.

    guard = DivergenceGuard(cfg.divergence, param_norm=norm_of(initial_state))
    for step ...:
        hit = guard.check(step, loss=..., grad_norm=..., param_norm=..., skipped=...)
        if hit: stop; checkpoints after `hit.good_bound` are set aside

What each signal says about which state is bad (step s = the s-th optimizer step; the checkpoint of step k
holds the state after k updates, which step k+1's loss and gradient are computed on):
  loss / grad_norm of step s  spiked -> the state of step s-1 produced it: good states are those <= s-2
  param_norm after step s     spiked -> the update of step s blew the parameters up: good <= s-1
A check compares against the median of the last `window` healthy steps (finite, not skipped, not flagged)
and starts once `min_history` of them were seen in this process (the parameter norm's history starts
with the initial / restored parameters, so it guards the first step already). A ratio of 0 turns its
check off. Non-finite losses and gradients are the non-finite guard's business (skipped, counted): they are
neither checked nor added to the history; a non-finite parameter norm (an update that overflowed) is a
divergence.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

from alm_jax.config import DivergenceConfig


@dataclasses.dataclass(frozen=True)
class Divergence:
    step: int
    metric: str           # "loss" | "grad_norm" | "param_norm"
    value: float
    median: float
    history: int          # how many healthy steps the median covers
    limit: float          # the configured ratio
    good_bound: int       # the newest step whose state is trusted

    def describe(self) -> str:
        what = {"loss": "the loss", "grad_norm": "the gradient norm",
                "param_norm": "the trainable-parameter norm after the update"}[self.metric]
        ratio = self.value / self.median if self.median > 0 else math.inf
        key = {"loss": "max_loss_ratio", "grad_norm": "max_grad_ratio", "param_norm": "max_param_ratio"}[self.metric]
        if not math.isfinite(self.value):
            return (f"training diverged at step {self.step}: {what} overflowed to {self.value} (the median of the "
                    f"last {self.history} healthy steps was {self.median:.4g}; divergence.{key}={self.limit:g})")
        return (f"training diverged at step {self.step}: {what} was {self.value:.4g}, {ratio:.3g}x the median "
                f"{self.median:.4g} of the last {self.history} healthy steps (divergence.{key}={self.limit:g})")


class DivergenceGuard:
    def __init__(self, cfg: DivergenceConfig, *, param_norm: float | None = None):
        self.cfg = cfg
        self.hist = {m: collections.deque(maxlen=cfg.window) for m in ("loss", "grad_norm", "param_norm")}
        if param_norm is not None and math.isfinite(param_norm):
            self.hist["param_norm"].append(float(param_norm))

    @property
    def wants_param_norm(self) -> bool:
        return self.cfg.max_param_ratio > 0

    def check(self, step: int, *, loss: float, grad_norm: float, param_norm: float | None = None,
              skipped: bool = False) -> Divergence | None:
        """The divergence step `step` shows, or None (then its values join the history)."""
        values = {"param_norm": param_norm}
        if not skipped and math.isfinite(loss) and math.isfinite(grad_norm):
            values.update(loss=loss, grad_norm=grad_norm)
        limits = {"loss": (self.cfg.max_loss_ratio, self.cfg.min_history, step - 2),
                  "grad_norm": (self.cfg.max_grad_ratio, self.cfg.min_history, step - 2),
                  "param_norm": (self.cfg.max_param_ratio, 1, step - 1)}
        for metric, (limit, need, bound) in limits.items():
            v, hist = values.get(metric), self.hist[metric]
            if v is None or limit <= 0 or len(hist) < need:
                continue
            median = statistics.median(hist)
            # a non-finite parameter norm: the update overflowed (the loss/grad are finite, or it was skipped)
            if median > 0 and (not math.isfinite(v) or v > limit * median):
                return Divergence(step, metric, float(v), float(median), len(hist), limit, bound)
        for metric, v in values.items():
            if v is not None and math.isfinite(v):
                self.hist[metric].append(float(v))
        return None
