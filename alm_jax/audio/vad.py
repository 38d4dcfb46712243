"""An energy-based voice-activity gate: does a clip hold speech worth transcribing?

DeSTA2.5 transcribes a clip with Whisper only when Silero VAD finds speech, and writes a single space " "
otherwise. Silero is a neural model we do not ship; this gate is its required stand-in, computed from
frame energies alone (numpy or JAX arrays, jit-able):

1. Split each clip's valid samples into 30 ms frames (`FRAME_SECONDS`, no overlap) and take each frame's
   RMS level in dBFS (full scale = amplitude 1.0).
2. The clip's noise floor is the `FLOOR_PERCENTILE` (10th) percentile of its frame levels.
3. A frame is active when it is louder than `ABS_THRESHOLD_DBFS` (-50 dBFS) AND at least `SNR_THRESHOLD_DB`
   (12 dB) above the floor: speech alternates syllables with pauses and weak consonants, so its loud
   frames stand far above its own quiet ones, while silence, a steady hum or stationary noise does not.
4. The clip holds speech when its active frames add up to `MIN_ACTIVE_SECONDS` (0.2 s) or more.

What it cannot do: tell speech from other modulated sounds (a bark, a drum hit, a chord onset also pass),
or find speech that runs without pauses under louder noise. Those cases call for a neural VAD.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from alm_jax.errors import AudioError

FRAME_SECONDS = 0.03
FLOOR_PERCENTILE = 10.0
ABS_THRESHOLD_DBFS = -50.0
SNR_THRESHOLD_DB = 12.0
MIN_ACTIVE_SECONDS = 0.2
_EPS = 1e-10


def frame_levels_db(audio, valid_samples=None, *, sample_rate: int = 16000,
                    frame_seconds: float = FRAME_SECONDS):
    """Frame RMS levels: audio `[N, S]` -> (levels `[N, F]` dBFS float32, valid `[N, F]` bool), F = S // frame;
    a frame is valid when it lies wholly inside the clip's `valid_samples` (default: all S)."""
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim != 2:
        raise AudioError(f"the VAD expects audio [clips, samples], got shape {audio.shape}; add a batch axis")
    frame = int(round(frame_seconds * sample_rate))
    n, s = audio.shape
    f = s // frame
    if f == 0:
        raise AudioError(f"clips of {s} samples are shorter than one {frame_seconds * 1000:.0f} ms VAD frame")
    frames = audio[:, :f * frame].reshape(n, f, frame)
    levels = 10.0 * jnp.log10(jnp.mean(jnp.square(frames), axis=-1) + _EPS)
    valid_samples = jnp.full((n,), s) if valid_samples is None else jnp.asarray(valid_samples)
    valid = (jnp.arange(f)[None, :] + 1) * frame <= valid_samples[:, None]
    return levels, valid


def energy_vad(audio, valid_samples=None, *, sample_rate: int = 16000, frame_seconds: float = FRAME_SECONDS,
               floor_percentile: float = FLOOR_PERCENTILE, abs_threshold_dbfs: float = ABS_THRESHOLD_DBFS,
               snr_threshold_db: float = SNR_THRESHOLD_DB, min_active_seconds: float = MIN_ACTIVE_SECONDS):
    """Speech / no speech per clip (see the module doc for the rule and its thresholds).

    audio `[N, S]` float (any scale; full scale 1.0), valid_samples `[N]` (optional, padding after them is
    ignored) -> `[N]` bool (a JAX array). Works under `jax.jit` (the thresholds are static)."""
    levels, valid = frame_levels_db(audio, valid_samples, sample_rate=sample_rate, frame_seconds=frame_seconds)
    floor = jnp.nanpercentile(jnp.where(valid, levels, jnp.nan), floor_percentile, axis=1, keepdims=True)
    active = valid & (levels > abs_threshold_dbfs) & (levels >= floor + snr_threshold_db)
    return active.sum(axis=1) * frame_seconds >= min_active_seconds - 1e-9


def transcript_or_space(has_speech, transcripts) -> list[str]:
    """DeSTA's rule: the Whisper transcript of a clip with speech, a single space " " for one without.
    has_speech `[N]` bool, transcripts: N strings."""
    return [t if bool(h) else " " for h, t in zip(np.asarray(has_speech).tolist(), transcripts, strict=True)]
