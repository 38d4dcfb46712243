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

**Pairs** (`source.pair(i) -> ClipPair`, MALLM-style minimal pairs): two clips that differ in exactly one
thing, `edit` in `PAIR_EDITS`: an event `add`ed, `remove`d or `replace`d (same span, another class) over the
same background, or one `word` of the same sentence changed (`synth.SENTENCE_SWAPS`), same voice, rate and
pitch (`CONTENT_EDITS`, the default); or, opted into with `pair_edits` (`LEVEL_EDITS`), the same clip with the
second one `level` 6-12 dB quieter (attributes `volume` high / low and `level_db` 0 / -drop, which the seed
descriptions show), or the same events over a noise background with the second one 1-3 s longer (`length`: the
shorter clip is the longer one's first samples). Shared parts are sample-identical: each event and the background
are rendered from their own seeds, the background has one gain for both clips (set by the first clip's SNR draw; each clip records its
own resulting SNR) and both clips get one peak scale (the louder clip peaks in [0.3, 0.9]). Pair `i`
depends only on `(seed, i)` and the settings, drawn from a stream separate from the clips'.

**Co-occurrence** (`source.cooccurrence_pairs()`): the mixing rule that a background sounds like an event
class (white noise, pink noise, mains hum ~ engine hum) as `("background:<kind>", label)` pairs: a clip
over that background contains that sound although it is not among its labels.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
SOUND_EDITS = ("add", "remove", "replace")
CONTENT_EDITS = SOUND_EDITS + ("word",)         # the default: pairs that differ in what is heard
LEVEL_EDITS = ("level", "length")              # opt-in: pairs that differ in how loud / how long
PAIR_EDITS = CONTENT_EDITS + LEVEL_EDITS
LEVEL_DROP_DB = (6.0, 12.0)        # a level pair's quieter clip, dB below the other
LENGTH_GAP_MS = (1000, 3000)       # a length pair's extra background, ms
BACKGROUND_KEY = "background:"     # prefix of a background in co-occurrence pairs
_PAIR_STREAM = 0x9A125             # pairs draw from their own stream, apart from the clips'


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


@dataclasses.dataclass(frozen=True)
class ClipPair:
    """Two demo clips that differ in one thing (see the module docstring).

    first, second: (ClipMeta, waveform float32 `[samples]`), same duration and background;
    edit: `add` (second has one more event, labelled `after`), `remove` (second lacks the event labelled
    `before`), `replace` (first's event `before` is `after` in second, same span), `word` (the
    utterance says `after` where first says `before`), `level` (second is quieter) or `length` (second is
    longer; before / after are None for these two); span: (start, end) seconds of the edited event, of the
    utterance (the union of both clips' utterance spans), of the whole clip (`level`) or of the longer clip's
    extra part (`length`). Both clips have the same duration except for `length`.
    """
    first: tuple[ClipMeta, np.ndarray]
    second: tuple[ClipMeta, np.ndarray]
    edit: str
    before: str | None
    after: str | None
    span: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class _Part:
    """One sound of a pair clip: its metadata (Event or Speech) and its waveform `[samples]` (gain applied)."""
    item: Event | Speech
    wave: np.ndarray

    @property
    def start(self) -> float:
        return self.item.onset if isinstance(self.item, Event) else self.item.start


class DemoSource:
    """Deterministic synthetic clips: `source[i] -> (ClipMeta, waveform float32 [samples])`.

    seed: non-negative int; n_clips: the source's length; kinds: a subset of KINDS; sample_rate: Hz.
    The other settings bound what is drawn (seconds, dB, words per minute, espeak pitch 0-99);
    pair_edits: the edits `pair(i)` draws from (`word` only when a speech kind is among `kinds`; default
    `CONTENT_EDITS`, `LEVEL_EDITS` opt in).
    """

    def __init__(self, seed: int = 0, n_clips: int = 1000, kinds: Sequence[str] = KINDS,
                 sample_rate: int = synth.SAMPLE_RATE, *, min_duration: float = 2.0, max_duration: float = 10.0,
                 max_events: int = 3, event_labels: Sequence[str] = synth.EVENT_LABELS,
                 backgrounds: Sequence[str] = synth.BACKGROUNDS, snr_db_range: tuple[float, float] = (0.0, 20.0),
                 rate_wpm_range: tuple[int, int] = (110, 210), pitch_range: tuple[int, int] = (20, 80),
                 voices: Sequence[str] = tuple(synth.VOICES), pair_edits: Sequence[str] = CONTENT_EDITS):
        _check(isinstance(seed, (int, np.integer)) and seed >= 0, f"seed must be an int >= 0, got {seed!r}")
        _check(isinstance(n_clips, (int, np.integer)) and n_clips >= 0, f"n_clips must be >= 0, got {n_clips!r}")
        _check_subset("kinds", kinds, KINDS)
        _check_subset("event_labels", event_labels, synth.EVENT_LABELS)
        _check_subset("backgrounds", backgrounds, synth.BACKGROUNDS)
        _check_subset("voices", voices, tuple(synth.VOICES))
        _check_subset("pair_edits", pair_edits, PAIR_EDITS)
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
        # word edits need speech among the kinds (so that 'speech' is in the label vocabulary)
        self.pair_edits = tuple(e for e in pair_edits if e != "word" or has_speech)

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

        meta = self._meta(f"demo-{self.seed}-{index:07d}", duration_ms, background, snr_db, events, speech,
                          {"kind": kind, "seed": self.seed, "index": index})
        return meta, waveform

    def _meta(self, clip_id: str, duration_ms: int, background: str, snr_db: float | None,
              events: Sequence[Event], speech: Sequence[Speech], extra: dict, attributes: dict | None = None
              ) -> ClipMeta:
        """The ClipMeta of a rendered clip: caption, labels and time-sorted events from its parts."""
        phrases = [(s.start, s.end, _speech_phrase(s)) for s in speech]
        phrases += [(e.onset, e.offset, synth.EVENT_CLASSES[e.label].phrase) for e in events]
        labels = sorted({e.label for e in events}) + ([SPEECH_LABEL] if speech else [])
        return ClipMeta(
            clip_id=clip_id, source=SOURCE_NAME, duration=duration_ms / 1000,
            sample_rate=self.sample_rate, caption=compose_caption(phrases, background), labels=tuple(labels),
            events=tuple(sorted(events, key=lambda e: (e.onset, e.offset))), speech=tuple(speech),
            attributes={"background": background, "snr_db": snr_db, **(attributes or {})},
            label_vocabulary=self.label_vocabulary, extra=extra)

    # -----------------------------------------------------------------------------------------------------
    # Co-occurrence and pairs

    def cooccurrence_pairs(self) -> tuple[tuple[str, str], ...]:
        """`("background:<kind>", label)` for each background this source draws that sounds like one of its
        event labels (the mixing rule that keeps such events off that background). A clip over that
        background contains the sound although the label is not among its labels."""
        return tuple((BACKGROUND_KEY + background, label) for background in self.backgrounds
                     for label in sorted(_MASKED_BY_BACKGROUND.get(background, ())) if label in self.event_labels)

    def pair(self, index: int) -> ClipPair:
        """Pair `index` (any int >= 0): two clips differing in one edit drawn from `pair_edits`.

        Raises ConfigError when no edit is possible (no `pair_edits` left, or too few event labels:
        `add`/`replace` need one label more than the clip has, over its background).
        """
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"pair indices are ints >= 0, got {index!r}")
        if not self.pair_edits:
            raise ConfigError("DemoSource: no pair edits available; word edits need a speech kind in `kinds` "
                              f"and an espeak-ng backend, sound edits need {list(SOUND_EDITS)} in pair_edits")
        index = int(index)
        rng = np.random.default_rng([self.seed, _PAIR_STREAM, index])
        edit = self.pair_edits[rng.integers(len(self.pair_edits))]
        duration_ms = int(rng.integers(round(self.min_duration * 1000), round(self.max_duration * 1000) + 1))
        background = self.backgrounds[rng.integers(len(self.backgrounds))]
        snr_db = round(float(rng.uniform(*self.snr_db_range)), 1)
        peak = float(rng.uniform(*PEAK))
        background_seed = int(rng.integers(2 ** 63))
        levels: list[dict] = [{}, {}]
        shorter_ms = None                     # the first clip's duration when it is shorter (`length`)
        if edit == "word":
            first, second, before, after, span, duration_ms = self._word_pair(rng, duration_ms)
        elif edit in SOUND_EDITS:
            first, second, before, after, span = self._event_pair(rng, edit, duration_ms, background)
        elif edit == "level":
            first, duration_ms = self._plain_parts(rng, duration_ms, background)
            second, before, after, span = first, None, None, (0.0, duration_ms / 1000)
            drop_db = round(float(rng.uniform(*LEVEL_DROP_DB)), 1)
            levels = [{"volume": "high", "level_db": 0.0}, {"volume": "low", "level_db": -drop_db}]
        else:   # length: the same events over noise (over silence the extra part would not be heard)
            background = self._noise_background(rng)
            shorter_ms, duration_ms = self._length_durations(rng)
            first, _ = self._plain_parts(rng, shorter_ms, background, events_only=True)
            second, before, after, span = first, None, None, (shorter_ms / 1000, duration_ms / 1000)
        durations = [duration_ms if shorter_ms is None else shorter_ms, duration_ms]
        waves, snrs = self._render_pair(first, second, duration_ms, background, snr_db, background_seed, peak)
        if edit == "level":
            waves[1] = (waves[1] * 10 ** (levels[1]["level_db"] / 20)).astype(np.float32)
        clips = []
        for member, (parts, wave, clip_snr) in enumerate(zip((first, second), waves, snrs)):
            meta = self._meta(
                f"demo-{self.seed}-pair{index:07d}-{'ab'[member]}", durations[member], background, clip_snr,
                [p.item for p in parts if isinstance(p.item, Event)],
                [p.item for p in parts if isinstance(p.item, Speech)],
                {"kind": "pair", "seed": self.seed, "index": index, "pair_member": member, "edit": edit},
                levels[member])
            clips.append((meta, wave[: self._sample(durations[member] / 1000)]))
        return ClipPair(clips[0], clips[1], edit, before, after, span)

    def _plain_parts(self, rng: np.random.Generator, duration_ms: int, background: str, events_only: bool = False
                     ) -> tuple[list[_Part], int]:
        """The unedited content of a `level` / `length` pair, of a kind drawn from `kinds` (events only when
        `events_only`), and its duration in ms (a speech clip is lengthened to fit its utterance)."""
        kind = "events" if events_only else self.kinds[rng.integers(len(self.kinds))]
        parts: list[_Part] = []
        if kind in SPEECH_KINDS:
            speech, speech_waves, speech_end_ms = self._utterances(rng, 1)
            parts += [_Part(s, w) for s, w in zip(speech, speech_waves)]
            tail_ms = int(rng.integers(200, 1001))
            duration_ms = max(duration_ms, min(speech_end_ms + tail_ms, self._max_ms), speech_end_ms)
        if kind != "speech":
            n_events = int(rng.integers(1, (self.max_events if kind == "events" else min(2, self.max_events)) + 1))
            events, event_waves = self._events(rng, n_events, duration_ms, background)
            parts += [_Part(e, w) for e, w in zip(events, event_waves)]
        return parts, duration_ms

    def _noise_background(self, rng: np.random.Generator) -> str:
        noisy = [b for b in self.backgrounds if b != "silence"]
        if not noisy:
            raise ConfigError("DemoSource.pair: a 'length' edit needs a noise background (over silence the longer "
                              "clip's extra part is not heard); allow one in `backgrounds` or drop 'length' from "
                              "pair_edits")
        return noisy[rng.integers(len(noisy))]

    def _length_durations(self, rng: np.random.Generator) -> tuple[int, int]:
        """(shorter, longer) durations in ms of a `length` pair: the shorter one in [min_duration, max_duration -
        gap] (at least 0.5 s), the longer one 1-3 s (the gap) longer."""
        room = self._max_ms - 500          # the shorter clip keeps at least half a second
        if room < LENGTH_GAP_MS[0]:
            raise ConfigError(f"DemoSource.pair: a 'length' edit needs max_duration >= "
                              f"{(LENGTH_GAP_MS[0] + 500) / 1000} s, got {self.max_duration}")
        gap_ms = int(rng.integers(LENGTH_GAP_MS[0], min(LENGTH_GAP_MS[1], room) + 1))
        longest = self._max_ms - gap_ms
        shorter = int(rng.integers(max(500, min(round(self.min_duration * 1000), longest)), longest + 1))
        return shorter, shorter + gap_ms

    def _event_pair(self, rng: np.random.Generator, edit: str, duration_ms: int, background: str
                    ) -> tuple[list[_Part], list[_Part], str | None, str | None, tuple[float, float]]:
        """(first parts, second parts, before, after, edited span) of a sound edit; labels are distinct."""
        candidates = [label for label in self.event_labels if label not in _MASKED_BY_BACKGROUND.get(background, ())]
        low, high = {"add": (1, max(1, self.max_events - 1)), "remove": (2, max(2, self.max_events)),
                     "replace": (1, self.max_events)}[edit]
        n_base = int(rng.integers(low, high + 1))
        needed = n_base if edit == "remove" else n_base + 1
        if len(candidates) < needed:
            raise ConfigError(f"DemoSource.pair: a {edit!r} edit of {n_base} event(s) over {background!r} needs "
                              f"{needed} distinct event labels, only {candidates} are available; allow more "
                              "event_labels or fewer max_events")
        labels = [candidates[c] for c in rng.choice(len(candidates), size=needed, replace=False)]
        base = [self._pair_event(rng, label, duration_ms) for label in labels[:n_base]]
        if edit == "add":
            added = self._pair_event(rng, labels[n_base], duration_ms)
            return base, base + [added], None, added.item.label, (added.item.onset, added.item.offset)
        k = int(rng.integers(n_base))
        old = base[k].item
        if edit == "remove":
            return base, base[:k] + base[k + 1:], old.label, None, (old.onset, old.offset)
        new = self._pair_event(rng, labels[n_base], duration_ms, span=(old.onset, old.offset))
        return base, base[:k] + [new] + base[k + 1:], old.label, new.item.label, (old.onset, old.offset)

    def _pair_event(self, rng: np.random.Generator, label: str, duration_ms: int,
                    span: tuple[float, float] | None = None) -> _Part:
        """One event of `label` at a random (or the given) span, rendered from its own seed."""
        if span is None:
            shortest, longest = (min(duration_ms, round(s * 1000)) for s in EVENT_SECONDS)
            length_ms = int(rng.integers(shortest, longest + 1))
            onset_ms = int(rng.integers(0, duration_ms - length_ms + 1))
            event = Event(label, onset_ms / 1000, (onset_ms + length_ms) / 1000)
        else:
            event = Event(label, *span)
        gain = 10 ** (rng.uniform(*GAIN_DB) / 20)
        wave_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
        n = self._sample(event.offset) - self._sample(event.onset)
        return _Part(event, synth.synthesize_event(label, n / self.sample_rate, self.sample_rate, wave_rng) * gain)

    def _word_pair(self, rng: np.random.Generator, duration_ms: int
                   ) -> tuple[list[_Part], list[_Part], str, str, tuple[float, float], int]:
        """(first, second, word, replacement, utterance span, duration ms): one utterance, one word changed."""
        sentence = synth.SENTENCES[rng.integers(len(synth.SENTENCES))]
        swaps = synth.SENTENCE_SWAPS[sentence]
        word = sorted(swaps)[rng.integers(len(swaps))]
        replacement = swaps[word][rng.integers(len(swaps[word]))]
        edited = re.sub(rf"\b{re.escape(word)}\b", replacement, sentence, count=1)
        voice = self.voices[rng.integers(len(self.voices))]
        rate = int(rng.integers(self.rate_wpm_range[0], self.rate_wpm_range[1] + 1))
        pitch = int(rng.integers(self.pitch_range[0], self.pitch_range[1] + 1))
        gain = 10 ** (rng.uniform(*GAIN_DB) / 20)
        start_ms = int(rng.integers(0, 501))
        attributes = {"gender": synth.VOICES[voice], "voice": voice, "rate_wpm": rate, "pitch": pitch,
                      "pitch_level": pitch_level(pitch), "speaking_speed": speaking_speed(rate)}
        parts = []
        for text in (sentence, edited):
            wave = synth.synthesize_speech(text, voice, rate, pitch, self.sample_rate)
            end_ms = start_ms + math.ceil(len(wave) * 1000 / self.sample_rate)
            parts.append(_Part(Speech(text, start_ms / 1000, end_ms / 1000, dict(attributes)),
                               wave * (gain / synth.loudness_rms(wave, self.sample_rate))))
        speech_end_ms = max(round(p.item.end * 1000) for p in parts)
        tail_ms = int(rng.integers(200, 1001))
        duration_ms = max(duration_ms, min(speech_end_ms + tail_ms, self._max_ms), speech_end_ms)
        span = (start_ms / 1000, speech_end_ms / 1000)
        return [parts[0]], [parts[1]], word, replacement, span, duration_ms

    def _render_pair(self, first: list[_Part], second: list[_Part], duration_ms: int, background: str,
                     snr_db: float, background_seed: int, peak: float
                     ) -> tuple[list[np.ndarray], list[float | None]]:
        """Both clips' waveforms float32 `[samples]` and SNRs (dB, None over silence), sharing one
        background gain (from the first clip at `snr_db`) and one peak scale."""
        n_samples = self._sample(duration_ms / 1000)
        foregrounds, actives = [], []
        for parts in (first, second):
            foreground, active = np.zeros(n_samples), np.zeros(n_samples, bool)
            for part in parts:
                a = self._sample(part.start)
                foreground[a: a + len(part.wave)] += part.wave
                active[a: a + len(part.wave)] = True
            foregrounds.append(foreground)
            actives.append(active)
        powers = [float(np.mean(f[a] ** 2)) for f, a in zip(foregrounds, actives)]
        mixtures, snrs = foregrounds, [None, None]
        if background != "silence":
            noise = synth.synthesize_background(background, n_samples / self.sample_rate, self.sample_rate,
                                                np.random.default_rng(background_seed)).astype(np.float64)
            noise_power = float(np.mean(noise ** 2))
            gain = math.sqrt(powers[0] / (noise_power * 10 ** (snr_db / 10)))
            mixtures = [f + gain * noise for f in foregrounds]
            snrs = [round(10 * math.log10(p / (gain ** 2 * noise_power)), 1) for p in powers]
        scale = peak / max(float(np.abs(m).max()) for m in mixtures)
        return [(m * scale).astype(np.float32) for m in mixtures], snrs

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
