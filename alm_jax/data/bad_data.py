"""Bad-sample accounting: skip a bad sample, count it by kind, fail only past a configured fraction.

Kinds come from the `kind` attribute of `AudioError` / `DataError` (e.g. `undecodable`, `nonfinite`,
`empty`, `too_long`, `missing_file`, `bad_json`, `bad_utf8`, `bad_record`). Samples that were kept but
changed (`truncated`: cut to the static text length) are counted apart (`adjusted`), never as bad. Counters
from several workers or processes merge with `merge`/`+`, and `to_dict` gives a JSON-able summary for metrics.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, TypeVar

from alm_jax.errors import AudioError, DataError

T = TypeVar("T")

DEFAULT_THRESHOLD = 0.01
CONFIG_KEY = "data.max_bad_fraction"
_MAX_EXAMPLES = 3


def error_kind(err: BaseException, default: str = "unknown") -> str:
    """The `kind` attribute of a package data/audio error, else `default`."""
    return getattr(err, "kind", None) or default


def data_error(kind: str, message: str) -> DataError:
    """A `DataError` carrying a machine-readable `kind`."""
    err = DataError(message)
    err.kind = kind
    return err


class BadDataCounter:
    """Counts samples seen and samples skipped by kind (with a few example messages per kind), and samples
    kept but changed (`adjusted`, by kind, e.g. `truncated`; they count as good)."""

    def __init__(self) -> None:
        self.seen = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self.adjusted: collections.Counter[str] = collections.Counter()

    def ok(self, n: int = 1) -> None:
        """Count `n` good samples."""
        self.seen += n

    def skip(self, kind: str, detail: str = "") -> None:
        """Count one bad (skipped) sample of `kind`; `detail` is kept as an example for messages."""
        self.seen += 1
        self.bad[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if detail and len(ex) < _MAX_EXAMPLES:
            ex.append(detail)

    def adjust(self, kind: str) -> None:
        """Count one kept sample that was changed (`kind`, e.g. `truncated`); `ok` counts it as seen."""
        self.adjusted[kind] += 1

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run `fn`; on `AudioError`/`DataError` count the sample as bad and return None, else count ok."""
        try:
            out = fn(*args, **kwargs)
        except (AudioError, DataError) as e:
            self.skip(error_kind(e), str(e))
            return None
        self.ok()
        return out

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def fraction(self) -> float:
        return self.total_bad / self.seen if self.seen else 0.0

    def check(self, threshold_fraction: float = DEFAULT_THRESHOLD, min_seen: int = 100,
              config_key: str = CONFIG_KEY) -> None:
        """Raise `DataError` (kind `too_many_bad`) when more than `threshold_fraction` of the samples
        seen were bad. Nothing is checked before `min_seen` samples, so one early bad file cannot stop
        a run."""
        if self.seen < min_seen or self.fraction <= threshold_fraction:
            return
        by_kind = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
        examples = "; ".join(f"{k}: {e[0]}" for k, e in sorted(self.examples.items()) if e)
        raise data_error(
            "too_many_bad",
            f"{self.total_bad} of {self.seen} samples were bad ({self.fraction:.2%}), above the "
            f"threshold {threshold_fraction:.2%}. By kind: {by_kind}. Examples: {examples or 'none'}. "
            f"Fix or remove the bad inputs, or raise `{config_key}` to tolerate more.")

    def merge(self, other: "BadDataCounter") -> "BadDataCounter":
        """Add `other`'s counts into this counter (in place); returns self."""
        self.seen += other.seen
        self.bad.update(other.bad)
        self.adjusted.update(other.adjusted)
        for k, ex in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(ex[: _MAX_EXAMPLES - len(mine)])
        return self

    def __add__(self, other: "BadDataCounter") -> "BadDataCounter":
        return BadDataCounter().merge(self).merge(other)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: `seen`, `bad` (by kind), `bad_total`, `bad_fraction`, `adjusted` (kept samples that
        were changed, by kind), `examples`."""
        return {"seen": self.seen, "bad": dict(sorted(self.bad.items())), "bad_total": self.total_bad,
                "bad_fraction": self.fraction, "adjusted": dict(sorted(self.adjusted.items())),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BadDataCounter":
        c = cls()
        c.seen = int(d.get("seen", 0))
        c.bad.update({k: int(v) for k, v in d.get("bad", {}).items()})
        c.adjusted.update({k: int(v) for k, v in d.get("adjusted", {}).items()})
        c.examples = {k: list(v) for k, v in d.get("examples", {}).items()}
        return c

    def metrics(self, prefix: str = "data/bad") -> dict[str, float]:
        """Flat scalars for a metrics logger: `{prefix}/{kind}` counts, `{prefix}/fraction`, and the kept but
        changed samples as `{prefix}/adjusted/{kind}`."""
        out = {f"{prefix}/{k}": float(v) for k, v in self.bad.items()}
        out.update({f"{prefix}/adjusted/{k}": float(v) for k, v in self.adjusted.items()})
        out[f"{prefix}/fraction"] = self.fraction
        out[f"{prefix}/seen"] = float(self.seen)
        return out

    def __repr__(self) -> str:
        return f"BadDataCounter(seen={self.seen}, bad={dict(self.bad)}, adjusted={dict(self.adjusted)})"
