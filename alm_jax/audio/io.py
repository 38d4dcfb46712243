"""Audio bytes <-> float32 waveforms: encode (FLAC / PCM16 WAV), decode, resample, validate.

Every failure a user's data can cause raises `AudioError` whose `kind` names the problem, so callers can
skip the sample and count it (`alm_jax.data.bad_data.BadDataCounter`):

| kind           | meaning                                                   |
|----------------|-----------------------------------------------------------|
| `undecodable`  | bytes are not audio, or are truncated                     |
| `nonfinite`    | NaN or inf samples                                        |
| `empty`        | zero samples                                              |
| `too_long`     | duration above the configured maximum (default 600 s)     |
| `missing_file` | the audio file does not exist                             |
"""

from __future__ import annotations

import io
import math
import os
import re
from typing import NamedTuple

import numpy as np
import soundfile as sf
from scipy import signal

from alm_jax.errors import AudioError

DEFAULT_MAX_SECONDS = 600.0
FORMATS = ("flac", "pcm16")
_SF_FORMAT = {"flac": ("FLAC", "PCM_16"), "pcm16": ("WAV", "PCM_16")}


class Waveform(NamedTuple):
    """Decoded audio: float32 `samples` [samples] (mono) or [samples, channels], at `sample_rate` Hz."""
    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def audio_error(kind: str, message: str) -> AudioError:
    """An `AudioError` carrying a machine-readable `kind` (see the module table)."""
    err = AudioError(message)
    err.kind = kind
    return err


def validate_audio(samples: np.ndarray, sample_rate: int, *,
                   max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Raise `AudioError` (kind `empty`, `too_long` or `nonfinite`) unless `samples` is usable audio.

    samples: [samples] or [samples, channels].
    """
    if sample_rate <= 0:
        raise audio_error("undecodable", f"sample rate must be positive, got {sample_rate}")
    n = samples.shape[0] if samples.ndim else 0
    if n == 0 or samples.size == 0:
        raise audio_error("empty", "audio has zero samples")
    _check_duration(n, sample_rate, max_seconds)
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise audio_error("nonfinite", f"audio has {bad} NaN/inf samples of {samples.size}")


def _check_duration(frames: int, sample_rate: int, max_seconds: float) -> None:
    seconds = frames / sample_rate
    if seconds > max_seconds:
        raise audio_error(
            "too_long", f"audio lasts {seconds:.1f} s, above the maximum of {max_seconds:g} s "
                        "(raise `max_seconds` / the data config's max_audio_seconds if this is intended)")


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = "flac") -> bytes:
    """Encode float32 `samples` [samples] or [samples, channels] in [-1, 1] as 16-bit FLAC or WAV bytes.

    Values outside [-1, 1] are clipped. Raises `AudioError` for invalid audio (see `validate_audio`).
    """
    if fmt not in _SF_FORMAT:
        raise audio_error("undecodable", f"unknown audio format {fmt!r}; use one of {FORMATS}")
    samples = np.asarray(samples, dtype=np.float32)
    validate_audio(samples, sample_rate, max_seconds=math.inf)
    container, subtype = _SF_FORMAT[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def audio_info(data: bytes) -> tuple[int, int, int]:
    """`(frames, sample_rate, channels)` from the header of encoded audio, without decoding it."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            return f.frames, f.samplerate, f.channels
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise audio_error("undecodable", f"cannot read audio header ({len(data)} bytes): {e}") from None


def decode_audio(data: bytes, *, target_sr: int | None = None, mono: bool = True,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode encoded audio (any format libsndfile reads) to float32.

    Returns [samples] when `mono` (channels averaged), else [samples, channels]; resampled to
    `target_sr` when given. The duration is checked from the header before decoding.
    """
    return _finish(decode_waveform(data, max_seconds=max_seconds), target_sr, mono)


def decode_waveform(data: bytes, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> Waveform:
    """Decode encoded audio to a `Waveform` (samples [samples, channels] float32, at the file's own rate),
    validated like `decode_audio` (kinds `undecodable`, `empty`, `too_long`, `nonfinite`)."""
    name = f"{len(data)} bytes of audio"
    _check_wav_complete(data, len(data), name)
    return _read(io.BytesIO(data), name, max_seconds=max_seconds)


def read_audio_file(path: str | os.PathLike, *, start: float | None = None, end: float | None = None,
                    max_seconds: float = DEFAULT_MAX_SECONDS) -> Waveform:
    """Read `[start, end)` seconds of an audio file (the whole file by default) at its own rate.

    Returns samples [samples, channels] float32. Raises `AudioError` kind `missing_file` when the file
    does not exist, else the kinds of `decode_audio`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise audio_error("missing_file", f"audio file not found: {path}")
    with open(path, "rb") as f:
        _check_wav_complete(f.read(1 << 16), os.path.getsize(path), path)
    return _read(path, path, start=start, end=end, max_seconds=max_seconds)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed sinc) along axis 0. samples: [samples, ...]."""
    if orig_sr == target_sr:
        return samples
    g = math.gcd(int(orig_sr), int(target_sr))
    out = signal.resample_poly(samples, target_sr // g, orig_sr // g, axis=0)
    return out.astype(np.float32, copy=False)


def _read(file, name: str, *, start: float | None = None, end: float | None = None,
          max_seconds: float) -> Waveform:
    """Decode `file` (path or file object) to Waveform [samples, channels], validating it."""
    try:
        with sf.SoundFile(file) as f:
            sr, total = f.samplerate, f.frames
            first = 0 if start is None else max(0, int(round(start * sr)))
            last = total if end is None else min(total, int(round(end * sr)))
            want = max(0, last - first)
            if want == 0:
                raise audio_error("empty", f"{name}: zero samples in the requested span "
                                           f"(file has {total} frames, span {start}-{end} s)")
            _check_duration(want, sr, max_seconds)
            if first:
                f.seek(first)
            samples = f.read(want, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = re.sub(r"^Error opening .*?: ", "", str(e))  # drop libsndfile's file-object repr
        raise audio_error("undecodable", f"{name}: cannot decode audio: {reason}") from None
    if samples.shape[0] < want:
        raise audio_error("undecodable", f"{name}: truncated audio: header promises {want} frames, "
                                         f"only {samples.shape[0]} decode")
    validate_audio(samples, sr, max_seconds=max_seconds)
    return Waveform(samples, sr)


def _check_wav_complete(head: bytes, total_size: int, name: str) -> None:
    """libsndfile silently shortens a truncated WAV; catch it from the RIFF `data` chunk size."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"data":
            if size != 0xFFFFFFFF and pos + 8 + size > total_size:
                raise audio_error("undecodable", f"{name}: truncated WAV: data chunk declares {size} bytes, "
                                                 f"only {total_size - pos - 8} present")
            return
        pos += 8 + size + (size & 1)


def _finish(wave: Waveform, target_sr: int | None, mono: bool) -> np.ndarray:
    samples = wave.samples
    if mono:
        samples = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    if target_sr is not None:
        samples = resample(samples, wave.sample_rate, target_sr)
    return np.ascontiguousarray(samples, dtype=np.float32)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[samples] or [samples, channels] -> [samples] (channel average)."""
    return samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)
