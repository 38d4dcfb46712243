"""Data-size scaling studies (`alm scale`): train on nested subsets of the training data, evaluate every
point on one held-out suite, fit metric(n) = a + b * n^(-c), write a table and a figure.

- `study`: points (fraction -> records, steps, run directory), running and resuming them, the table, the CLI.
- `fit`: the saturating power law with parameter standard errors (scipy `curve_fit`).
- `plot`: the figure (matplotlib, Agg).
"""

from alm_jax.scaling.fit import describe, fit_power_law, predict
from alm_jax.scaling.study import Budget, Point, Study, add_parser, evaluate_point, plan_points, report

__all__ = ["Budget", "Point", "Study", "add_parser", "describe", "evaluate_point", "fit_power_law", "plan_points",
           "predict", "report"]
