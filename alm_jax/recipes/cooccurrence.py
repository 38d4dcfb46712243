"""Which labels may sound in a clip without being among its labels: the guard on BALSa's negatives.

A BALSa negative names a sound that is *not* in the clip. Naming one that is in fact audible teaches the
model to deny what it hears, so a negative must avoid the clip's labels **and every label that co-occurs
with the clip's context**. The context of a clip is its labels plus its background as the key
`background:<kind>` (no key for silence or no background). Co-occurrence is a symmetric relation over
these keys, from one of two places:

- **the source's mixing rules** (`Cooccurrence.from_source`): a source that knows how it builds clips
  says which contexts contain which sounds unlabelled, by a method `cooccurrence_pairs() -> ((key,
  label), ...)`. The demo synth (`DemoSource.cooccurrence_pairs`): a white-noise background contains white
  noise, a pink-noise background pink noise, a mains-hum background sounds like an engine hum (the same
  table the synth uses to keep those events off those backgrounds). Its event classes are otherwise mixed
  independently, so no pair of event labels co-occurs by rule.
- **the source's metadata** (`Cooccurrence.from_clips`): two keys co-occur when at least `min_count`
  clips hold both. For real corpora with incomplete labels (AudioSet-style), a sound seen with a present
  one may be present but unlabelled; with `min_count=1` a negative never names a label that was ever
  seen with any of the clip's labels or its background.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable

from alm_jax.data.metadata import ClipMeta
from alm_jax.data.sources.demo import BACKGROUND_KEY
from alm_jax.errors import ConfigError

NO_BACKGROUND = ("", "silence", "none")


def clip_context(meta: ClipMeta) -> frozenset[str]:
    """The co-occurrence keys of a clip: its labels and `background:<kind>` (unless silent/absent)."""
    keys = set(meta.labels)
    background = meta.attributes.get("background")
    if background and str(background) not in NO_BACKGROUND:
        keys.add(BACKGROUND_KEY + str(background))
    return frozenset(keys)


class Cooccurrence:
    """A symmetric relation over context keys (labels and `background:<kind>`): `related(keys)` is every
    key that co-occurs with one of `keys`."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self._related: dict[str, set[str]] = collections.defaultdict(set)
        for a, b in pairs:
            if not (isinstance(a, str) and isinstance(b, str)):
                raise ConfigError(f"co-occurrence pairs are (str, str), got ({a!r}, {b!r})")
            if a != b:
                self._related[a].add(b)
                self._related[b].add(a)

    @classmethod
    def from_source(cls, source) -> "Cooccurrence":
        """The pairs a source declares by its mixing rules (`source.cooccurrence_pairs()`)."""
        declare = getattr(source, "cooccurrence_pairs", None)
        if declare is None:
            raise ConfigError(f"{type(source).__name__} declares no co-occurrence rules (no "
                              "cooccurrence_pairs()); use cooccurrence='metadata' to count them from its clips")
        return cls(declare())

    @classmethod
    def from_clips(cls, metas: Iterable[ClipMeta], min_count: int = 1) -> "Cooccurrence":
        """Pairs of keys that appear together in the contexts of at least `min_count` of `metas`."""
        if not isinstance(min_count, int) or min_count < 1:
            raise ConfigError(f"co-occurrence min_count must be an int >= 1, got {min_count!r}")
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for meta in metas:
            counts.update(itertools.combinations(sorted(clip_context(meta)), 2))
        return cls(pair for pair, n in counts.items() if n >= min_count)

    def __or__(self, other: "Cooccurrence") -> "Cooccurrence":
        return Cooccurrence(itertools.chain(self.pairs(), other.pairs()))

    def pairs(self) -> list[tuple[str, str]]:
        """Each related pair once, as (a, b) with a < b, sorted."""
        return sorted({tuple(sorted((a, b))) for a, bs in self._related.items() for b in bs})

    def related(self, keys: Iterable[str]) -> frozenset[str]:
        """Every key that co-occurs with at least one of `keys` (not including `keys` themselves)."""
        keys = set(keys)
        return frozenset(set().union(*(self._related.get(k, ()) for k in keys)) - keys)

    def excluded(self, meta: ClipMeta) -> frozenset[str]:
        """Labels a negative for `meta` must not name: its context and everything related to it."""
        context = clip_context(meta)
        return context | self.related(context)

    def absent_labels(self, meta: ClipMeta) -> tuple[str, ...]:
        """Labels of `meta.label_vocabulary` that are neither in the clip nor co-occur with it (vocabulary order)."""
        excluded = self.excluded(meta)
        return tuple(label for label in dict.fromkeys(meta.label_vocabulary) if label not in excluded)
