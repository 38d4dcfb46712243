"""Normalized metadata of one audio clip: what every source yields and every recipe reads.

Sources (JSONL manifest, TFDS directory, the built-in demo synth) map their own fields onto `ClipMeta`;
recipes turn it into seed descriptions and prompts. Times are in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Event:
    """A labelled sound event inside the clip, `[onset, offset)` seconds."""
    label: str
    onset: float
    offset: float


@dataclasses.dataclass(frozen=True)
class Speech:
    """A speech segment: its transcript, time span, and speaker attributes (gender, voice, rate, ...)."""
    transcript: str
    start: float
    end: float
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ClipMeta:
    """Everything known about one clip.

    `labels` are the clip-level labels present; `label_vocabulary` is the full set the source draws
    labels from, so that BALSa-style absent labels can be chosen from `label_vocabulary - labels`.
    `attributes` holds clip-level attributes (e.g. background, SNR, emotion); `extra` anything else.
    """
    clip_id: str
    source: str
    duration: float
    sample_rate: int
    caption: str | None = None
    labels: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    speech: tuple[Speech, ...] = ()
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    label_vocabulary: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def transcript(self) -> str:
        """All speech segments' transcripts joined in time order ('' when there is no speech)."""
        return " ".join(s.transcript for s in sorted(self.speech, key=lambda s: s.start)).strip()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `from_dict(to_dict(m)) == m`."""
        d = dataclasses.asdict(self)
        d["labels"], d["label_vocabulary"] = list(self.labels), list(self.label_vocabulary)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipMeta":
        d = dict(d)
        d["events"] = tuple(Event(**e) for e in d.get("events", ()))
        d["speech"] = tuple(Speech(**s) for s in d.get("speech", ()))
        d["labels"] = tuple(d.get("labels", ()))
        d["label_vocabulary"] = tuple(d.get("label_vocabulary", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            d.setdefault("extra", {})
            d["extra"] = {**d["extra"], **{k: d.pop(k) for k in unknown}}
        return cls(**d)
