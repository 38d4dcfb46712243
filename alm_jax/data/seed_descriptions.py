"""Seed descriptions: the text a backbone LLM reads in place of a clip, built from its `ClipMeta`.

One line per speech segment, sound event or background, ordered by start time (at equal start times:
background, then speech, then events, each shorter first). Times are `mm:ss` with the start rounded down and the end
rounded up to whole seconds; durations are whole seconds (`2s`), or one decimal below half a second
(`0.4s`). Speech attributes are rendered from `Speech.attributes` keys in this order, unknown keys skipped:
emotion, gender, age, accent, language, pitch_level (as Pitch), volume, speaking_speed (as Speaking speed).
The clip background comes from `ClipMeta.attributes["background"]` (and `"snr_db"`); 'silence' is omitted.
A clip-level `attributes["volume"]` (and `"level_db"`, e.g. a quieter copy of a clip) is a line of its own,
`[00:00-00:10] (Volume: Low, 8.5 dB quieter)`.

**DeSTA** (DeSTA2.5-Audio `[mm:ss-mm:ss] transcript (Attr: value, ...)`), capitalized keys and values,
Duration last::

    [00:00-00:10] (Background: pink noise, SNR: 12.5 dB)
    [00:00-00:02] Excuse me? (Gender: Female, Pitch: High, Speaking speed: Slow, Duration: 2s)
    [00:01-00:04] (Audio category: dog bark, Duration: 3s)

A clip without timed events uses its non-speech labels, `[00:00-00:10] (Audio category: dog, siren)`, or
if it has no speech either, its caption: `[00:00-00:10] (A dog barks in the distance.)`.

**ALARM** (non-speech content in pipes), lower-case keys, duration first::

    [00:00-00:10] |background: pink noise (SNR 12.5 dB)|
    [00:00-00:02] Excuse me? (duration: 2s, gender: Female, pitch: High, speaking speed: Slow)
    [00:01-00:04] |dog bark|

Untimed non-speech content is a bare `|dog, siren|` or `|A dog barks in the distance.|` line.
"""

from __future__ import annotations

import math
from typing import Any

from alm_jax.data.metadata import ClipMeta, Speech

SPEECH_LABEL = "speech"
SPEECH_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("emotion", "Emotion"), ("gender", "Gender"), ("age", "Age"), ("accent", "Accent"),
    ("language", "Language"), ("pitch_level", "Pitch"), ("volume", "Volume"),
    ("speaking_speed", "Speaking speed"),
)
_BACKGROUND_RANK, _SPEECH_RANK, _EVENT_RANK = 0, 1, 2


def format_timestamp(seconds: float, round_up: bool = False) -> str:
    """`mm:ss` of `seconds`, rounded down (or up); minutes keep counting past 59 (`75:03`)."""
    whole = math.ceil(seconds - 1e-6) if round_up else math.floor(seconds + 1e-6)
    whole = max(0, whole)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def format_span(start: float, end: float) -> str:
    """`[mm:ss-mm:ss]` covering [start, end) seconds."""
    return f"[{format_timestamp(start)}-{format_timestamp(end, round_up=True)}]"


def format_duration(seconds: float) -> str:
    """`2s` (whole seconds, half up) or, below half a second, `0.4s`."""
    whole = math.floor(seconds + 0.5)
    return f"{whole}s" if whole >= 1 else f"{seconds:.1f}s"


def _value(value: Any) -> str:
    """An attribute value as text: strings get a capital first letter, numbers print plainly."""
    if isinstance(value, str):
        return value[:1].upper() + value[1:]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _speech_attributes(segment: Speech) -> list[tuple[str, str]]:
    """(title, value) pairs of the known attributes of `segment`, in SPEECH_ATTRIBUTES order."""
    return [(title, _value(segment.attributes[key])) for key, title in SPEECH_ATTRIBUTES
            if segment.attributes.get(key) is not None]


def _background(meta: ClipMeta) -> tuple[str, float | None] | None:
    """(background kind, SNR dB or None), or None for no / silent background."""
    kind = meta.attributes.get("background")
    if not kind or kind == "silence":
        return None
    return str(kind), meta.attributes.get("snr_db")


def _volume(meta: ClipMeta) -> str | None:
    """'Low, 8.5 dB quieter' from the clip's `volume` (and negative `level_db`) attributes, or None."""
    volume = meta.attributes.get("volume")
    if not volume:
        return None
    level_db = meta.attributes.get("level_db")
    return _value(volume) + (f", {-level_db:g} dB quieter" if level_db is not None and level_db < 0 else "")


def _untimed_sound(meta: ClipMeta) -> tuple[str, str] | None:
    """('labels' | 'caption', text) describing non-speech content when the clip has no timed events."""
    if meta.events:
        return None
    labels = [label for label in meta.labels if label != SPEECH_LABEL]
    if labels:
        return "labels", ", ".join(labels)
    if not meta.speech and meta.caption:
        return "caption", meta.caption
    return None


def _joined(lines: list[tuple[float, int, float, str]]) -> str:
    return "\n".join(text for *_, text in sorted(lines))


def desta_seed_description(meta: ClipMeta) -> str:
    """The DeSTA2.5 seed description of `meta` (see the module docstring); '' for a clip with nothing known."""
    lines: list[tuple[float, int, float, str]] = []
    clip_span = format_span(0.0, meta.duration)
    background = _background(meta)
    if background:
        kind, snr_db = background
        snr = f", SNR: {snr_db:g} dB" if snr_db is not None else ""
        lines.append((0.0, _BACKGROUND_RANK, meta.duration, f"{clip_span} (Background: {kind}{snr})"))
    volume = _volume(meta)
    if volume:
        lines.append((0.0, _BACKGROUND_RANK, meta.duration, f"{clip_span} (Volume: {volume})"))
    for s in meta.speech:
        attributes = _speech_attributes(s) + [("Duration", format_duration(s.end - s.start))]
        fields = ", ".join(f"{title}: {value}" for title, value in attributes)
        lines.append((s.start, _SPEECH_RANK, s.end, f"{format_span(s.start, s.end)} {s.transcript} ({fields})"))
    for e in meta.events:
        lines.append((e.onset, _EVENT_RANK, e.offset, f"{format_span(e.onset, e.offset)} "
                      f"(Audio category: {e.label}, Duration: {format_duration(e.offset - e.onset)})"))
    untimed = _untimed_sound(meta)
    if untimed:
        what, text = untimed
        body = f"Audio category: {text}" if what == "labels" else text
        lines.append((0.0, _EVENT_RANK, meta.duration, f"{clip_span} ({body})"))
    return _joined(lines)


def alarm_seed_description(meta: ClipMeta) -> str:
    """The ALARM seed description of `meta` (see the module docstring); '' for a clip with nothing known."""
    lines: list[tuple[float, int, float, str]] = []
    background = _background(meta)
    if background:
        kind, snr_db = background
        snr = f" (SNR {snr_db:g} dB)" if snr_db is not None else ""
        lines.append((0.0, _BACKGROUND_RANK, meta.duration,
                      f"{format_span(0.0, meta.duration)} |background: {kind}{snr}|"))
    volume = _volume(meta)
    if volume:
        lines.append((0.0, _BACKGROUND_RANK, meta.duration, f"{format_span(0.0, meta.duration)} |volume: {volume}|"))
    for s in meta.speech:
        attributes = [("duration", format_duration(s.end - s.start))]
        attributes += [(title.lower(), value) for title, value in _speech_attributes(s)]
        fields = ", ".join(f"{title}: {value}" for title, value in attributes)
        lines.append((s.start, _SPEECH_RANK, s.end, f"{format_span(s.start, s.end)} {s.transcript} ({fields})"))
    for e in meta.events:
        lines.append((e.onset, _EVENT_RANK, e.offset, f"{format_span(e.onset, e.offset)} |{e.label}|"))
    untimed = _untimed_sound(meta)
    if untimed:
        lines.append((0.0, _EVENT_RANK, meta.duration, f"|{untimed[1]}|"))
    return _joined(lines)
