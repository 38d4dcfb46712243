"""Evaluation results for people: checkpoints side by side in a markdown table, and a progress line per batch.

    rows = {"runs/a": {"step": 1000, "eval/mmau/accuracy": 41.2}, "runs/b": {"step": 2000, ...}}
    print(markdown_table(rows, title="mmau"))
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Mapping[str, Mapping[str, Any]], title: str | None = None) -> str:
    """One column per checkpoint (`name (step N)`), one row per metric (in first-seen order); a metric a
    checkpoint lacks shows as '–'."""
    names = list(rows)
    metrics: dict[str, None] = {}
    for r in rows.values():
        metrics.update({k: None for k in r if k != "step"})
    head = [f"{n} (step {rows[n].get('step', '?')})" for n in names]
    lines = ([f"## {title}", ""] if title else []) + [
        "| metric | " + " | ".join(_cell(h) for h in head) + " |",
        "|---|" + "---:|" * len(names)]
    for m in metrics:
        lines.append(f"| {_cell(m)} | " + " | ".join(_cell(rows[n].get(m)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def progress_printer(label: str, stream: TextIO | None = None, *, force: bool = False) -> Callable[[int, int], None] | None:
    """A `(done, total)` callback writing `label: done/total items, items/s, elapsed, ETA` to stderr after each
    batch, or None
    when the stream is not a terminal (logs stay quiet) unless `force`."""
    stream = stream or sys.stderr
    if not force and not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    start = time.time()

    def report(done: int, total: int) -> None:
        elapsed = time.time() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        stream.write(f"{label}: {done}/{total} items, {rate:.2f} items/s, {elapsed:.0f} s, ETA {eta:.0f} s\n")
        stream.flush()
    return report
