"""The saturating power law of a data-size study: metric(n) = a + b * n^(-c), n = training records.

`fit_power_law(n, y)` fits it with `scipy.optimize.curve_fit` and reports each parameter with its standard
error (the square root of the covariance's diagonal). Internally n is scaled by `n_ref = max(n)` (the
problem is then well conditioned); the reported `b` is for unscaled n, its error carried by the delta method.

How many parameters are free depends on the points (a fit needs more points than free parameters to give
errors):
- 4 or more points: a, b and c are all fitted;
- 2 or 3 points: `a` (the floor the metric saturates at) is held fixed at 0, a pure power law b * n^(-c)
  (with 2 points it passes through both exactly, so there are no standard errors);
- fewer: no fit.
`fixed={"a": 1.5}` (or c, or b) holds parameters fixed explicitly. Every result names what was fitted and
what was held fixed (`free`, `fixed`) and says why in `note`; `status` is "ok", "not_fitted" or "failed"
(the optimizer did not converge): a study reports it and goes on, it never passes silently.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np

PARAMS = ("a", "b", "c")
MODEL = "metric(n) = a + b * n^(-c)"
MIN_POINTS_ALL_FREE = 4
_C_GRID = np.concatenate([-np.geomspace(2.0, 0.01, 30), np.geomspace(0.01, 3.0, 60)])


def predict(n, a: float, b: float, c: float) -> np.ndarray:
    """a + b * n^(-c) for records `n` (array-like)."""
    return a + b * np.power(np.asarray(n, dtype=np.float64), -c)


def default_fixed(points: int) -> dict[str, float]:
    """The parameters held fixed for `points` points when the caller fixes none (see the module doc)."""
    return {} if points >= MIN_POINTS_ALL_FREE else {"a": 0.0}


def _linear_ab(x: np.ndarray, y: np.ndarray, c: float, fixed: Mapping[str, float]) -> tuple[dict, float]:
    """For a fixed exponent c the model is linear in a and b: their least-squares values (the fixed ones
    kept) and the sum of squared residuals."""
    z = np.power(x, -c)
    cols, names = [], []
    rhs = y.copy()
    for name, col in (("a", np.ones_like(x)), ("b", z)):
        if name in fixed:
            rhs = rhs - fixed[name] * col
        else:
            cols.append(col)
            names.append(name)
    vals = dict(fixed)
    if cols:
        sol, *_ = np.linalg.lstsq(np.stack(cols, axis=1), rhs, rcond=None)
        vals.update(zip(names, (float(s) for s in sol)))
    vals["c"] = c
    resid = y - predict(x, vals["a"], vals["b"], c)
    return vals, float(resid @ resid)


def _initial_guess(x: np.ndarray, y: np.ndarray, fixed: Mapping[str, float]) -> dict[str, float]:
    """The best of a grid of exponents (each with its least-squares a, b): curve_fit then only refines."""
    grid = [fixed["c"]] if "c" in fixed else _C_GRID
    best, best_sse = None, math.inf
    for c in grid:
        vals, sse = _linear_ab(x, y, float(c), fixed)
        if sse < best_sse and all(math.isfinite(v) for v in vals.values()):
            best, best_sse = vals, sse
    if best is None:
        best = {"a": 0.0, "b": 1.0, "c": 0.5, **fixed}
    return best


def fit_power_law(n: Sequence[float], y: Sequence[float], *, fixed: Mapping[str, float] | None = None,
                  sigma: Sequence[float] | None = None) -> dict:
    """Fits metric(n) = a + b * n^(-c) to records `n` and metric values `y`.

    fixed: parameters held at given values (None: `default_fixed(len(n))`); sigma: per-point standard
    deviations (absolute) for a weighted fit. Returns a JSON-able dict: `status` ("ok" | "not_fitted" |
    "failed"), `model`, `points`, `free`, `fixed`, `params` {a, b, c}, `stderr` {name: value or None (held
    fixed, or no degrees of freedom left)}, `dof`, `rmse`, `n_ref`, `note` (what was held fixed and why)."""
    x = np.asarray(n, dtype=np.float64)
    yv = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(yv) & (x > 0)
    dropped = int((~keep).sum())
    x, yv = x[keep], yv[keep]
    sig = None if sigma is None else np.asarray(sigma, dtype=np.float64)[keep]
    points = int(len(x))
    auto = fixed is None
    fixed = dict(default_fixed(points) if auto else fixed)
    unknown = set(fixed) - set(PARAMS)
    if unknown:
        raise ValueError(f"fixed: unknown parameters {sorted(unknown)}; choose from {list(PARAMS)}")
    fixed = {k: float(v) for k, v in fixed.items()}
    free = [p for p in PARAMS if p not in fixed]
    notes = []
    if dropped:
        notes.append(f"{dropped} point(s) with a non-finite metric or records <= 0 left out")
    if auto and fixed:
        notes.append(f"only {points} point(s) (< {MIN_POINTS_ALL_FREE}): held {_say_fixed(fixed)} fixed, "
                     f"fitting {', '.join(free)}")
    elif fixed:
        notes.append(f"held {_say_fixed(fixed)} fixed as asked")
    out = {"model": MODEL, "x": "records", "points": points, "free": free, "fixed": fixed,
           "params": None, "stderr": None, "dof": points - len(free), "rmse": None, "n_ref": None}
    if points < max(len(free), 1) or len(np.unique(x)) < len(free):
        notes.append(f"not fitted: {len(free)} free parameter(s) need at least {len(free)} distinct record "
                     f"counts, got {len(np.unique(x))}")
        return {**out, "status": "not_fitted", "note": "; ".join(notes)}
    if not free:
        params = dict(fixed)
        resid = yv - predict(x, params["a"], params["b"], params["c"])
        return {**out, "status": "ok", "params": params, "stderr": {p: None for p in PARAMS},
                "rmse": float(np.sqrt(np.mean(resid ** 2))), "note": "; ".join(notes + ["every parameter fixed"])}

    n_ref = float(x.max())
    xs = x / n_ref   # fit a + b' * xs^(-c); b = b' * n_ref^c

    def scaled_fixed() -> dict[str, float]:
        f = dict(fixed)
        if "b" in f:   # b is given for unscaled n: b' = b * n_ref^(-c) needs c fixed or is refitted below
            f["b"] = f["b"] * n_ref ** (-f["c"]) if "c" in f else f["b"]
        return f

    sfixed = scaled_fixed()
    b_fixed_c_free = "b" in fixed and "c" not in fixed

    def model(xv, *theta):
        vals = dict(sfixed)
        vals.update(zip(free, theta))
        b = vals["b"] * n_ref ** (-vals["c"]) if b_fixed_c_free else vals["b"]   # b' depends on c here
        return vals["a"] + b * np.power(xv, -vals["c"])

    if b_fixed_c_free:   # rare: b fixed on the unscaled axis, exponent free: start from a grid in c directly
        guess = _initial_guess(x, yv, fixed)
        p0 = [guess[p] for p in free]
    else:
        guess = _initial_guess(xs, yv, sfixed)
        p0 = [guess[p] for p in free]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # OptimizeWarning (no covariance at dof 0) is handled below
            theta, pcov = _curve_fit(model, xs, yv, p0, sig)
    except (RuntimeError, ValueError, FloatingPointError) as e:
        notes.append(f"the fit did not converge: {e}")
        return {**out, "status": "failed", "note": "; ".join(notes), "n_ref": n_ref}
    scaled = dict(sfixed)
    scaled.update(zip(free, (float(t) for t in theta)))
    dof = points - len(free)
    cov_ok = dof > 0 and pcov is not None and np.all(np.isfinite(pcov))
    idx = {p: i for i, p in enumerate(free)}

    # back to unscaled n: a, c unchanged; b = b' * n_ref^c (unless b was fixed on the unscaled axis)
    params = {"a": scaled["a"], "c": scaled["c"]}
    if "b" in fixed:
        params["b"] = fixed["b"]
    else:
        params["b"] = scaled["b"] * n_ref ** scaled["c"]
    stderr: dict[str, float | None] = {p: None for p in PARAMS}
    if cov_ok:
        for p in ("a", "c"):
            if p in idx:
                stderr[p] = float(math.sqrt(max(pcov[idx[p], idx[p]], 0.0)))
        if "b" in idx:   # delta method: d b / d b' = n_ref^c, d b / d c = b' n_ref^c ln n_ref
            g = np.zeros(len(free))
            g[idx["b"]] = n_ref ** scaled["c"]
            if "c" in idx:
                g[idx["c"]] = scaled["b"] * n_ref ** scaled["c"] * math.log(n_ref)
            stderr["b"] = float(math.sqrt(max(g @ pcov @ g, 0.0)))
    elif dof == 0:
        notes.append(f"{points} point(s) for {len(free)} free parameter(s): the curve passes through them, "
                     "no standard errors")
    else:
        notes.append("the covariance could not be estimated (degenerate data): no standard errors")
    resid = yv - predict(x, params["a"], params["b"], params["c"])
    if not all(math.isfinite(v) for v in params.values()):
        notes.append("the fit gave non-finite parameters")
        return {**out, "status": "failed", "note": "; ".join(notes), "n_ref": n_ref}
    return {**out, "status": "ok", "params": params, "stderr": stderr, "dof": dof,
            "rmse": float(np.sqrt(np.mean(resid ** 2))), "n_ref": n_ref, "note": "; ".join(notes)}


def _curve_fit(model, xs, y, p0, sigma):
    from scipy.optimize import curve_fit
    kw = {"sigma": sigma, "absolute_sigma": True} if sigma is not None else {}
    return curve_fit(model, xs, y, p0=p0, maxfev=20000, **kw)


def _say_fixed(fixed: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in fixed.items())


def describe(fit: Mapping, metric: str = "metric") -> str:
    """One line: `eval/loss = a + b * n^(-c): a = 2.1 (±0.05), b = 31.6 (±4), c = 0.52 (±0.03)`, each
    parameter held fixed marked `(fixed)`, or why there is no fit."""
    if fit.get("status") != "ok":
        return f"{metric}: no fit ({fit.get('note') or fit.get('status')})"
    p, se = fit["params"], fit.get("stderr") or {}

    def one(name: str) -> str:
        v = f"{name} = {p[name]:.4g}"
        if name in fit.get("fixed", {}):
            return f"{v} (fixed)"
        return f"{v} (±{se[name]:.2g})" if se.get(name) is not None else v
    return f"{metric} = a + b * n^(-c): " + ", ".join(one(k) for k in PARAMS)
