"""Training metrics: per-step timing, window aggregates, and logging to JSONL + TensorBoard + a
progress line.

    timer, agg = StepTimer(), MetricsAggregator(flops_per_step=f, num_devices=n, peak_flops_per_device=p)
    with MetricsLogger(run_dir, total_steps=1000) as log:
        for step in range(1, 1001):
            batch = timer.fetch(it)                  # data-wait time: time spent in next(it)
            with timer.step():
                state, out = train_step(state, batch)
            agg.add(loss=out["loss"], grad_norm=out["grad_norm"], tokens=n_tok, samples=bs,
                    step_time=timer.last_step, data_wait=timer.last_data_wait, skipped=out["skipped"])
            if step % 10 == 0:
                log.log(step, agg.summary(lr=lr))

Only process 0 writes (files and progress). `metrics.jsonl` holds one JSON object per logged step;
non-finite floats are written as null. TensorBoard scalars are the same keys; a dict value such as
`bad_samples_by_kind` becomes `bad_samples_by_kind/<kind>`. A row with an "event" key is not metrics
but a record of something that happened at that step (`MetricsLogger.event`: e.g. a resume that accepted
a changed config or discarded later checkpoints).

**Resuming** (`start_step=k`): the file keeps one timeline. Rows of steps after k (written by the run that
went past the checkpoint being resumed) are moved to `metrics.discarded.jsonl`, and TensorBoard is told to
purge its points after k, so every step is logged once, by the run whose state the checkpoints hold.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from alm_jax.training.flops import mfu as _mfu

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics.discarded.jsonl"


# ------------------------------------------------------------------------------------------- timing


class StepTimer:
    """Splits wall time into data wait (inside `next(iterator)`) and step time (inside `step()`).

    Wait on the step's output inside `step()` (the trainer reads its scalars there): with asynchronous
    dispatch the step call returns before the device is done, and a loop that waits on every step never
    fills the dispatch queue, so timing the call alone measures only dispatch."""

    def __init__(self):
        self.last_data_wait = 0.0
        self.last_step = 0.0

    def fetch(self, iterator: Iterator):
        """`next(iterator)`, timed as data wait (StopIteration passes through)."""
        with self.data():
            return next(iterator)

    def data(self):
        """Context manager: the time inside it becomes `last_data_wait`."""
        return self._timed("last_data_wait")

    def step(self):
        """Context manager: the time inside it becomes `last_step`."""
        return self._timed("last_step")

    @contextlib.contextmanager
    def _timed(self, attr: str):
        """The one timing piece: stores the wall time spent inside the block in `self.<attr>`, also when
        the block raises."""
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, attr, time.perf_counter() - t)


# ------------------------------------------------------------------------------------------- aggregates


class MetricsAggregator:
    """Collects per-step values between two log steps and summarizes them.

    Pass global counts (tokens/samples of the whole step over all processes) and the per-device
    `num_devices` = total devices, so rates and MFU are global.
    Per-step device values (loss, grad_norm) may stay jax Arrays: they are fetched together in
    `summary()`, so adding them does not force a host sync every step.
    Summary keys: loss, grad_norm (means over non-skipped steps), lr, tokens_per_s, samples_per_s
    (over step + data-wait wall time), step_time, data_wait (means, s), mfu (None without a peak),
    skipped_steps and bad_samples_by_kind (totals since the start), steps (in this window)."""

    def __init__(self, *, flops_per_step: float | None = None, num_devices: int = 1,
                 peak_flops_per_device: float | None = None):
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak = peak_flops_per_device
        self.skipped_total = 0
        self.bad_samples: dict[str, int] = {}
        self._reset()

    def _reset(self):
        self._loss, self._gnorm = [], []
        self._tokens = self._samples = self._n = 0
        self._step_time = self._data_wait = 0.0

    def add(self, *, loss=None, tokens: int = 0, samples: int = 0, step_time: float = 0.0,
            data_wait: float = 0.0, grad_norm=None, skipped=False,
            bad_samples: Mapping[str, int] | None = None) -> None:
        """One step. `skipped`: the update was skipped (non-finite); its loss/grad_norm are not averaged.
        `bad_samples`: counts by kind of samples dropped while building this step's batch."""
        skipped = bool(skipped)
        self._n += 1
        self._tokens += int(tokens)
        self._samples += int(samples)
        self._step_time += float(step_time)
        self._data_wait += float(data_wait)
        if skipped:
            self.skipped_total += 1
        else:
            if loss is not None:
                self._loss.append(loss)
            if grad_norm is not None:
                self._gnorm.append(grad_norm)
        for kind, n in (bad_samples or {}).items():
            self.bad_samples[kind] = self.bad_samples.get(kind, 0) + int(n)

    def summary(self, **extra) -> dict[str, Any]:
        """The window's metrics (plus `extra`, e.g. lr=...), then starts a new window."""
        def mean(xs):
            if not xs:
                return None
            vals = np.asarray([np.asarray(x, np.float64) for x in _device_get(xs)])
            return float(vals.mean())
        wall = self._step_time + self._data_wait
        n = max(self._n, 1)
        out: dict[str, Any] = {
            "loss": mean(self._loss),
            "grad_norm": mean(self._gnorm),
            "tokens_per_s": self._tokens / wall if wall > 0 else None,
            "samples_per_s": self._samples / wall if wall > 0 else None,
            "step_time": self._step_time / n,
            "data_wait": self._data_wait / n,
            "mfu": (_mfu(self.flops_per_step * self._n, wall, self.num_devices, self.peak)
                    if self.flops_per_step and wall > 0 else None),
            "skipped_steps": self.skipped_total,
            "bad_samples_by_kind": dict(self.bad_samples),
            "steps": self._n,
        }
        out.update(extra)
        self._reset()
        return out


def _device_get(xs):
    try:
        import jax
        return jax.device_get(xs)
    except ImportError:  # pragma: no cover
        return xs


# ------------------------------------------------------------------------------------------- logger


def _plain(v):
    """JSON-safe scalar: numpy/jax scalars -> Python; non-finite floats -> None."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, str)):
        return v
    if hasattr(v, "shape") and getattr(v, "shape", ()) == ():
        v = np.asarray(v).item()
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f if math.isfinite(f) else None


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}")


class MetricsLogger:
    """Writes `metrics.jsonl` and TensorBoard event files under `dir` and shows a progress line.

    progress: "on" always; "off" never; "auto" when `stream` is a TTY and the env var CI is not set.
    Only `process_index == 0` writes or prints anything (pass `jax.process_index()`)."""

    def __init__(self, dir: str | os.PathLike, *, tensorboard: bool = True,
                 progress: Literal["auto", "on", "off"] = "auto", total_steps: int,
                 process_index: int = 0, stream=None, start_step: int | None = None):
        if progress not in ("auto", "on", "off"):
            raise ValueError(f"progress={progress!r}: choose one of auto, on, off")
        self.dir = Path(dir)
        self.total_steps = int(total_steps)
        self.active = process_index == 0
        self.stream = stream if stream is not None else sys.stdout
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        self.show_progress = self.active and (progress == "on" or (progress == "auto" and self._tty and not ci))
        self._jsonl = None
        self._tb = None
        self._t0 = time.perf_counter()
        self._first_step: int | None = None
        self._line_open = False      # a TTY progress line without its newline yet
        self.dropped = 0             # rows moved to metrics.discarded.jsonl (start_step)
        if not self.active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            self.dropped = drop_rows_after(self.dir, start_step)
        self._jsonl = open(self.dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            purge = {"purge_step": int(start_step) + 1} if start_step is not None else {}
            self._tb = SummaryWriter(logdir=str(self.dir / "tb"), **purge)

    @classmethod
    def from_config(cls, cfg, *, total_steps: int, process_index: int = 0, **kw) -> "MetricsLogger":
        """From a `LoggingConfig` (dir, tensorboard, progress)."""
        return cls(cfg.dir, tensorboard=cfg.tensorboard, progress=cfg.progress, total_steps=total_steps,
                   process_index=process_index, **kw)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` at `step` (JSONL line, TensorBoard scalars, progress line)."""
        if not self.active:
            return
        if self._first_step is None:
            self._first_step, self._t0 = step, time.perf_counter()
        row = {"step": int(step), "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k in ("step", "time"):
                    continue
                items = v.items() if isinstance(v, dict) else [(None, v)]
                for sub, x in items:
                    if isinstance(x, (int, float)) and not isinstance(x, bool):
                        self._tb.add_scalar(k if sub is None else f"{k}/{sub}", x, int(step))
            self._tb.flush()
        if self.show_progress:
            self._progress(step, row)

    def event(self, step: int, event: str, **fields) -> None:
        """A JSONL row `{"step", "time", "event", **fields}` (no TensorBoard, no progress line)."""
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3), "event": event,
               **{k: _plain(v) for k, v in fields.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()

    def _progress(self, step: int, row: Mapping[str, Any]) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        if row.get("loss") is not None:
            parts.append(f"loss {row['loss']:.4f}")
        if row.get("tokens_per_s") is not None:
            parts.append(f"{_fmt_rate(row['tokens_per_s'])} tok/s")
        done = step - self._first_step
        if done > 0:
            per_step = (time.perf_counter() - self._t0) / done
            parts.append(f"{1 / per_step:.3g} step/s" if per_step > 0 else "")
            if step < self.total_steps:
                parts.append(f"ETA {_fmt_duration(per_step * (self.total_steps - step))}")
        elif row.get("step_time") is not None and step < self.total_steps:
            parts.append(f"ETA {_fmt_duration(row['step_time'] * (self.total_steps - step))}")
        line = " | ".join(p for p in parts if p)
        if self._tty:
            self._line_open = step < self.total_steps
            self.stream.write("\r\x1b[2K" + line + ("" if self._line_open else "\n"))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_rows_after(dir: str | os.PathLike, step: int) -> int:
    """Moves the rows of `dir/metrics.jsonl` with a step after `step` (and any line cut short) to
    `dir/metrics.discarded.jsonl` (appended); returns how many moved."""
    path = Path(dir) / METRICS_FILE
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    keep, drop = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):   # a line cut short by a kill: not a row
            s = math.inf
        (drop if isinstance(s, (int, float)) and s > step else keep).append(line + "\n")
    if drop:
        with open(Path(dir) / DISCARDED_FILE, "a", encoding="utf-8") as f:
            f.writelines(drop)
    if drop or (text and not text.endswith("\n")):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(path)
    return len(drop)


def read_metrics(dir: str | os.PathLike) -> list[dict]:
    """The rows of `dir/metrics.jsonl`."""
    with open(Path(dir) / METRICS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
