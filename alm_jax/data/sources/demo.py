"""The built-in demo source: deterministic synthetic clips with exact metadata (`source = "demo"`).

`DemoSource(seed, n_clips)[i]` is `(ClipMeta, waveform)`, waveform float32 `[samples]` at `sample_rate`.
Clip `i` depends only on `(seed, i)` and the constructor's settings (not on `n_clips`, nor on which clips
were made before), so any subset can be made independently, in any order, in parallel.

Clip kinds (drawn per clip, uniformly over `kinds`):

- `events`: 1 to `max_events` sound events (`alm_jax.audio.synth.EVENT_CLASSES`) with exact onset/offset;
- `speech`: one or two espeak-ng utterances (transcript, voice, gender, rate, pitch);
- `mixture`: one utterance plus one or two events (events may overlap the speech).

Clip durations are drawn in [min_duration, max_duration] seconds (a speech clip is lengthened to fit its
utterance, past max_duration only if one utterance is longer); times are whole milliseconds. Every clip
is laid over a background (silence, white / pink / brown noise, mains hum) at an SNR drawn in
`snr_db_range` (foreground power measured over the samples where events or speech sound; `snr_db` is None
over silence), then scaled to a peak in [0.3, 0.9]. Event classes a background would mask (white noise on
white noise, pink on pink, engine hum on mains hum) are not drawn over it.
Without an espeak-ng backend the speech kinds are dropped with a warning (`synth.speech_available()`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from alm_jax.audio import synth
from alm_jax.data.metadata import ClipMeta, Event, Speech
from alm_jax.errors import ConfigError

SOURCE_NAME = "demo"
KINDS = ("events", "speech", "mixture")
SPEECH_KINDS = frozenset({"speech", "mixture"})
SPEECH_LABEL = "speech"

# Event classes that would be indistinguishable from (or masked by) a background.
_MASKED_BY_BACKGROUND = {"white noise": {"white noise"}, "pink noise": {"pink noise"}, "hum": {"engine hum"}}
_BACKGROUND_PHRASES = {"white noise": "over steady white noise", "pink noise": "over pink noise",
                       "brown noise": "over a low rumbling noise", "hum": "over an electrical hum"}
EVENT_SECONDS = (0.5, 4.0)        # event durations, clipped to the clip
GAIN_DB = (-6.0, 0.0)             # per event / utterance, relative to loudest-20-ms RMS 1
PEAK = (0.3, 0.9)                 # final peak level
SECOND_UTTERANCE_PROBABILITY = 0.3


def pitch_level(pitch: int) -> str:
    """Coarse pitch of an espeak pitch setting (0-99, 50 = the voice's normal): low / medium / high."""
    return "low" if pitch < 35 else "medium" if pitch <= 65 else "high"


def speaking_speed(rate_wpm: int) -> str:
    """Coarse speaking speed of a rate in words per minute: slow (< 140) / normal / fast (> 185)."""
    return "slow" if rate_wpm < 140 else "normal" if rate_wpm <= 185 else "fast"


def compose_caption(phrases: Sequence[tuple[float, float, str]], background: str) -> str:
    """A templated English caption from (start s, end s, phrase) items and the background kind.

    Items are told in time order, joined by ', then ' or, when one starts before an earlier one ended,
    ' while '; a non-silent background adds e.g. ', over pink noise'. Example:
    'A siren wails, then a dog barks while a bell rings, over pink noise.'
    """
    text, latest_end = "", -math.inf
    for start, end, phrase in sorted(phrases):
        if not text:
            text = phrase[0].upper() + phrase[1:]
        else:
            text += (" while " if start < latest_end else ", then ") + phrase
        latest_end = max(latest_end, end)
    if not text:
        return "Silence." if background == "silence" else f"{background[:1].upper()}{background[1:]} only."
    if background in _BACKGROUND_PHRASES:
        text += ", " + _BACKGROUND_PHRASES[background]
    return text + "."


class DemoSource:
    """Deterministic synthetic clips: `source[i] -> (ClipMeta, waveform float32 [samples])`.

    seed: non-negative int; n_clips: the source's length; kinds: a subset of KINDS; sample_rate: Hz.
    The other settings bound what is drawn (seconds, dB, words per minute, espeak pitch 0-99).
    """

    def __init__(self, seed: int = 0, n_clips: int = 1000, kinds: Sequence[str] = KINDS,
                 sample_rate: int = synth.SAMPLE_RATE, *, min_duration: float = 2.0, max_duration: float = 10.0,
                 max_events: int = 3, event_labels: Sequence[str] = synth.EVENT_LABELS,
                 backgrounds: Sequence[str] = synth.BACKGROUNDS, snr_db_range: tuple[float, float] = (0.0, 20.0),
                 rate_wpm_range: tuple[int, int] = (110, 210), pitch_range: tuple[int, int] = (20, 80),
                 voices: Sequence[str] = tuple(synth.VOICES)):
        _check(isinstance(seed, (int, np.integer)) and seed >= 0, f"seed must be an int >= 0, got {seed!r}")
        _check(isinstance(n_clips, (int, np.integer)) and n_clips >= 0, f"n_clips must be >= 0, got {n_clips!r}")
        _check_subset("kinds", kinds, KINDS)
        _check_subset("event_labels", event_labels, synth.EVENT_LABELS)
        _check_subset("backgrounds", backgrounds, synth.BACKGROUNDS)
        _check_subset("voices", voices, tuple(synth.VOICES))
        _check(synth.MIN_SAMPLE_RATE <= sample_rate <= synth.MAX_SAMPLE_RATE,
               f"sample_rate must be in [{synth.MIN_SAMPLE_RATE}, {synth.MAX_SAMPLE_RATE}], got {sample_rate}")
        _check(0.1 <= min_duration <= max_duration <= synth.MAX_SECONDS,
               f"need 0.1 <= min_duration <= max_duration <= {synth.MAX_SECONDS}, "
               f"got {min_duration}, {max_duration}")
        _check(max_events >= 1, f"max_events must be >= 1, got {max_events}")
        _check(all(map(math.isfinite, snr_db_range)) and snr_db_range[0] <= snr_db_range[1],
               f"snr_db_range must be finite (low, high), got {snr_db_range}")
        _check(synth.RATE_RANGE_WPM[0] <= rate_wpm_range[0] <= rate_wpm_range[1] <= synth.RATE_RANGE_WPM[1],
               f"rate_wpm_range must lie in {synth.RATE_RANGE_WPM}, got {rate_wpm_range}")
        _check(synth.PITCH_RANGE[0] <= pitch_range[0] <= pitch_range[1] <= synth.PITCH_RANGE[1],
               f"pitch_range must lie in {synth.PITCH_RANGE}, got {pitch_range}")

        kinds = tuple(kinds)
        if SPEECH_KINDS & set(kinds) and not synth.speech_available():
            kept = tuple(k for k in kinds if k not in SPEECH_KINDS)
            if not kept:
                raise synth.SpeechUnavailableError(
                    f"DemoSource kinds {kinds} all need speech: {synth.speech_backend_description()}")
            warnings.warn(f"{synth.speech_backend_description()} DemoSource makes only {kept} clips.",
                          stacklevel=2)
            kinds = kept
        self.seed, self.n_clips, self.kinds, self.sample_rate = int(seed), int(n_clips), kinds, int(sample_rate)
        self.min_duration, self.max_duration, self.max_events = min_duration, max_duration, max_events
        self.event_labels, self.backgrounds = tuple(event_labels), tuple(backgrounds)
        self.snr_db_range, self.rate_wpm_range, self.pitch_range = snr_db_range, rate_wpm_range, pitch_range
        self.voices = tuple(voices)
        has_speech = bool(SPEECH_KINDS & set(kinds))
        self.label_vocabulary = self.event_labels + ((SPEECH_LABEL,) if has_speech else ())

    def __len__(self) -> int:
        return self.n_clips

    def __iter__(self) -> Iterator[tuple[ClipMeta, np.ndarray]]:
        return (self[i] for i in range(self.n_clips))

    def __getitem__(self, index: int) -> tuple[ClipMeta, np.ndarray]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"DemoSource indices are ints, got {type(index).__name__}")
        if index < 0:
            index += self.n_clips
        if not 0 <= index < self.n_clips:
            raise IndexError(f"clip {index} out of range for a DemoSource of {self.n_clips} clips")
        return self.clip(int(index))

    def clip(self, index: int) -> tuple[ClipMeta, np.ndarray]:
        """Clip `index` (any int >= 0, even past `n_clips`): (ClipMeta, waveform float32 [samples])."""
        rng = np.random.default_rng([self.seed, index])
        kind = self.kinds[rng.integers(len(self.kinds))]
        duration_ms = int(rng.integers(round(self.min_duration * 1000), round(self.max_duration * 1000) + 1))
        background = self.backgrounds[rng.integers(len(self.backgrounds))]

        speech, speech_waves = [], []
        if kind in SPEECH_KINDS:
            n_utterances = 2 if kind == "speech" and rng.random() < SECOND_UTTERANCE_PROBABILITY else 1
            speech, speech_waves, speech_end_ms = self._utterances(rng, n_utterances)
            tail_ms = int(rng.integers(200, 1001))
            duration_ms = max(duration_ms, min(speech_end_ms + tail_ms, self._max_ms), speech_end_ms)
        events, event_waves = [], []
        if kind in ("events", "mixture"):
            n_events = int(rng.integers(1, (self.max_events if kind == "events" else min(2, self.max_events)) + 1))
            events, event_waves = self._events(rng, n_events, duration_ms, background)

        n_samples = self._sample(duration_ms / 1000)
        foreground, active = np.zeros(n_samples), np.zeros(n_samples, bool)
        spans = [(s.start, s.end) for s in speech] + [(e.onset, e.offset) for e in events]
        for (start, _), wave in zip(spans, speech_waves + event_waves):
            first = self._sample(start)
            foreground[first: first + len(wave)] += wave
            active[first: first + len(wave)] = True

        snr_db = None
        if background == "silence":
            mixture = foreground
        else:
            snr_db = round(float(rng.uniform(*self.snr_db_range)), 1)
            noise = synth.synthesize_background(background, n_samples / self.sample_rate, self.sample_rate, rng)
            mixture = synth.mix_at_snr(foreground, noise, snr_db, active)
        peak = float(np.abs(mixture).max())
        waveform = (mixture * (rng.uniform(*PEAK) / peak if peak > 0 else 1.0)).astype(np.float32)

        phrases = [(s.start, s.end, _speech_phrase(s)) for s in speech]
        phrases += [(e.onset, e.offset, synth.EVENT_CLASSES[e.label].phrase) for e in events]
        labels = sorted({e.label for e in events}) + ([SPEECH_LABEL] if speech else [])
        meta = ClipMeta(
            clip_id=f"demo-{self.seed}-{index:07d}", source=SOURCE_NAME, duration=duration_ms / 1000,
            sample_rate=self.sample_rate, caption=compose_caption(phrases, background), labels=tuple(labels),
            events=tuple(sorted(events, key=lambda e: (e.onset, e.offset))), speech=tuple(speech),
            attributes={"background": background, "snr_db": snr_db}, label_vocabulary=self.label_vocabulary,
            extra={"kind": kind, "seed": self.seed, "index": index})
        return meta, waveform

    def _sample(self, seconds: float) -> int:
        return int(round(seconds * self.sample_rate))

    @property
    def _max_ms(self) -> int:
        return round(self.max_duration * 1000)

    def _utterances(self, rng: np.random.Generator, count: int) -> tuple[list[Speech], list[np.ndarray], int]:
        """Up to `count` utterances one after another (a later one is dropped if it ends past max_duration).

        Returns (segments, waveforms [samples] each, end of the last one in ms).
        """
        segments, waves, cursor_ms = [], [], int(rng.integers(0, 501))
        for k in range(count):
            voice = self.voices[rng.integers(len(self.voices))]
            rate = int(rng.integers(self.rate_wpm_range[0], self.rate_wpm_range[1] + 1))
            pitch = int(rng.integers(self.pitch_range[0], self.pitch_range[1] + 1))
            text = synth.SENTENCES[rng.integers(len(synth.SENTENCES))]
            gain = 10 ** (rng.uniform(*GAIN_DB) / 20)
            wave = synth.synthesize_speech(text, voice, rate, pitch, self.sample_rate)
            end_ms = cursor_ms + math.ceil(len(wave) * 1000 / self.sample_rate)  # padded to whole ms
            if k > 0 and end_ms > self._max_ms:
                break
            segments.append(Speech(text, cursor_ms / 1000, end_ms / 1000, {
                "gender": synth.VOICES[voice], "voice": voice, "rate_wpm": rate, "pitch": pitch,
                "pitch_level": pitch_level(pitch), "speaking_speed": speaking_speed(rate)}))
            waves.append(wave * (gain / synth.loudness_rms(wave, self.sample_rate)))
            cursor_ms = end_ms + int(rng.integers(200, 1001))
        return segments, waves, int(round(segments[-1].end * 1000))

    def _events(self, rng: np.random.Generator, count: int, duration_ms: int, background: str
                ) -> tuple[list[Event], list[np.ndarray]]:
        """`count` events (distinct classes while possible) at random times inside the clip."""
        candidates = [label for label in self.event_labels if label not in _MASKED_BY_BACKGROUND.get(background, ())]
        candidates = candidates or list(self.event_labels)
        chosen = rng.choice(len(candidates), size=count, replace=count > len(candidates))
        shortest, longest = (min(duration_ms, round(s * 1000)) for s in EVENT_SECONDS)
        events, waves = [], []
        for c in chosen:
            length_ms = int(rng.integers(shortest, longest + 1))
            onset_ms = int(rng.integers(0, duration_ms - length_ms + 1))
            event = Event(candidates[c], onset_ms / 1000, (onset_ms + length_ms) / 1000)
            n = self._sample(event.offset) - self._sample(event.onset)
            gain = 10 ** (rng.uniform(*GAIN_DB) / 20)
            waves.append(synth.synthesize_event(event.label, n / self.sample_rate, self.sample_rate, rng) * gain)
            events.append(event)
        return events, waves


def _speech_phrase(segment: Speech) -> str:
    """'a woman speaks quickly' from a speech segment's gender and speaking speed."""
    who = {"female": "a woman", "male": "a man"}.get(segment.attributes.get("gender"), "someone")
    how = {"slow": " slowly", "fast": " quickly"}.get(segment.attributes.get("speaking_speed"), "")
    return f"{who} speaks{how}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"DemoSource: {message}")


def _check_subset(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    if isinstance(values, str) or not values:
        raise ConfigError(f"DemoSource: {name} must be a non-empty sequence of names from {list(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"DemoSource: unknown {name} {unknown}; choose from {list(allowed)}")
