"""The study's figure: one panel per metric, its points over training records (log x) with the fitted
saturating power law and the fit in the panel's title. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from alm_jax.errors import ConfigError
from alm_jax.scaling.fit import describe, predict


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("`alm scale` draws its figure with matplotlib, which is not installed: "
                          "pip install matplotlib (or --no-plot)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_study(rows: Sequence[Mapping], fits: Mapping[str, Mapping], metrics: Sequence[str], path: str | Path,
               *, title: str = "") -> Path:
    """Writes a PNG of `metrics` (keys of each row's `metrics`) against `records`, with `fits[metric]`
    (`fit_power_law` results) drawn as curves. Returns the path."""
    plt = _pyplot()
    metrics = list(metrics)
    panels = max(len(metrics), 1)
    fig, axes = plt.subplots(panels, 1, figsize=(7.5, 4.2 * panels), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics or ["(no metric)"]):
        pts = [(r["records"], r["metrics"][metric], r.get("fraction")) for r in rows
               if metric in r.get("metrics", {}) and np.isfinite(r["metrics"][metric])]
        if pts:
            n = np.array([p[0] for p in pts], dtype=float)
            y = np.array([p[1] for p in pts], dtype=float)
            ax.plot(n, y, "o", color="C0", markersize=7, label="runs", zorder=3)
            for ni, yi, f in pts:
                if f is not None:
                    ax.annotate(f"f={f:g}", (ni, yi), textcoords="offset points", xytext=(6, 6), fontsize=8)
            fit = fits.get(metric) or {}
            if fit.get("status") == "ok":
                lo, hi = n.min(), n.max()
                grid = np.geomspace(lo / 1.5, hi * 1.5, 200) if hi > lo else np.geomspace(lo / 2, lo * 2, 50)
                p = fit["params"]
                ax.plot(grid, predict(grid, p["a"], p["b"], p["c"]), "-", color="C1",
                        label="fit a + b·n^(-c): " + ", ".join(fit["free"]) + " fitted"
                        + "".join(f", {k}={v:g} fixed" for k, v in fit.get("fixed", {}).items()), zorder=2)
                if "a" not in fit.get("fixed", {}):
                    ax.axhline(p["a"], color="C1", linestyle=":", linewidth=1, label=f"a = {p['a']:.4g}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
        ax.set_xscale("log")
        _plain_log_ticks(ax, [r["records"] for r in rows])
        ax.set_xlabel("training records n (nested subsets of data.corpus)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(_wrap(describe(fits.get(metric) or {"status": "not_fitted"}, metric)), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain_log_ticks(ax, records) -> None:
    """Tick labels as plain numbers (12, 50, 1000, 1e+06), the 2x and 5x minor ones too over a short range."""
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    finite = [float(r) for r in records if r and r > 0]
    decades = np.log10(max(finite) / min(finite)) if finite else 0.0

    def minor(v, _):
        lead = round(v / 10 ** np.floor(np.log10(v))) if v > 0 else 0
        return f"{v:g}" if decades <= 2.5 and lead in (2, 5) else ""
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _wrap(text: str, width: int = 95) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or text
