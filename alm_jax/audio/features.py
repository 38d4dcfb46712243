"""Whisper log-mel features in JAX, equal to `transformers.WhisperFeatureExtractor`.

Pipeline (per example): zero-pad/truncate to `pad_to_seconds` (or keep the length), reflect-pad by
n_fft/2, frame (n_fft 400, hop 160), periodic Hann window, |rFFT|^2, Slaney mel filterbank, drop the last
frame, log10(max(x, 1e-10)), floor at (example max - 8), then (x + 4) / 4. Batched, static shapes, jit-able.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alm_jax.errors import AudioError

N_FFT = 400
HOP_LENGTH = 160
MEL_FMAX = 8000.0  # the extractor's upper edge, whatever the sample rate


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


@functools.lru_cache(maxsize=None)
def mel_filterbank(n_mels: int, sample_rate: int, n_fft: int = N_FFT, fmax: float = MEL_FMAX) -> np.ndarray:
    """Slaney-normalized triangular filters on the Slaney mel scale, `[n_fft // 2 + 1, n_mels]` float64."""
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    fft_hz = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    width = np.diff(edges_hz)                                       # [n_mels + 1]
    dist = edges_hz[None, :] - fft_hz[:, None]                      # [bins, n_mels + 2]
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    tri = np.maximum(0.0, np.minimum(rising, falling))
    fb = tri * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=None)
def _hann(n: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window default), float32."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def num_frames(samples: int, *, sample_rate: int = 16000, pad_to_seconds: float | None = 30.0) -> int:
    """Number of log-mel frames `log_mel` returns for `samples` input samples."""
    if pad_to_seconds is not None:
        samples = int(round(pad_to_seconds * sample_rate))
    return samples // HOP_LENGTH


FRAME_RULES = ("whisper", "w2v_bert", "clap")   # encoder kinds (EncoderConfig.kind) with a frame rule below


def encoder_frames(num_samples, kind: str = "whisper"):
    """Valid encoder frames (50 Hz) for `num_samples` valid 16 kHz samples, by encoder kind; the one place these
    rules are written (connectors count their audio tokens from them). Ints and integer numpy/JAX arrays alike.

    whisper: stride-2 conv over log-mel frames, `ceil((samples // 160) / 2)`.
    w2v_bert: stacked pairs of kaldi fbank frames, `(1 + (samples - 400) // 160) // 2` (0 below 400 samples);
      one frame fewer than Whisper for most lengths (1 s: 49 vs 50).
    clap: one state row per clip (its clip embedding), 0 for an empty clip."""
    if kind == "whisper":
        return (num_samples // HOP_LENGTH + 1) // 2
    if kind == "w2v_bert":
        from alm_jax.audio.fbank import stacked_frames
        return stacked_frames(num_samples)
    if kind == "clap":
        return (num_samples > 0) * 1
    raise AudioError(f"no encoder frame rule for encoder kind {kind!r}; known: {FRAME_RULES}")


def window_samples(pad_to_seconds: float, sample_rate: int) -> int:
    """Samples in a fixed `pad_to_seconds` window (both log-mel implementations pad/crop to it)."""
    target = int(round(pad_to_seconds * sample_rate))
    if target <= 0:
        raise AudioError(f"pad_to_seconds={pad_to_seconds} gives no samples; use a positive duration or None")
    return target


@functools.partial(jax.jit, static_argnames=("n_mels", "sample_rate", "pad_to_seconds"))
def log_mel(audio: jax.Array, *, n_mels: int = 80, sample_rate: int = 16000,
            pad_to_seconds: float | None = 30.0) -> jax.Array:
    """Whisper log-mel spectrogram.

    audio `[batch, samples]` float -> `[batch, n_mels, frames]` float32, where frames = 3000 for the default
    30 s window (the input is zero-padded or truncated to it, and the per-example max used for the
    dynamic-range floor is taken over that whole window, as the extractor does), or `samples // 160` with
    `pad_to_seconds=None` (trimmed input, no padding).
    """
    if audio.ndim != 2:
        raise AudioError(f"log_mel expects audio [batch, samples], got shape {audio.shape}; "
                         "add a batch axis with audio[None] for one clip")
    audio = audio.astype(jnp.float32)
    if pad_to_seconds is not None:
        target = window_samples(pad_to_seconds, sample_rate)
        n = audio.shape[1]
        audio = audio[:, :target] if n >= target else jnp.pad(audio, ((0, 0), (0, target - n)))
    n = audio.shape[1]
    half = N_FFT // 2
    if n <= half:
        raise AudioError(f"audio of {n} samples is too short for log_mel: need more than {half} samples "
                         f"({half / sample_rate * 1000:.1f} ms at {sample_rate} Hz)")
    frames = n // HOP_LENGTH  # 1 + n // hop centered frames, the last one dropped
    padded = jnp.pad(audio, ((0, 0), (half, half)), mode="reflect")
    idx = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]  # [frames, n_fft]
    windowed = padded[:, idx] * _hann(N_FFT)                                     # [batch, frames, n_fft]
    spec = jnp.fft.rfft(windowed, axis=-1)                                       # [batch, frames, bins]
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    fb = jnp.asarray(mel_filterbank(n_mels, sample_rate), jnp.float32)
    mel = jnp.matmul(power, fb, precision=jax.lax.Precision.HIGHEST)             # [batch, frames, n_mels]
    logm = jnp.log10(jnp.maximum(mel, 1e-10))
    logm = jnp.maximum(logm, logm.max(axis=(1, 2), keepdims=True) - 8.0)
    return jnp.swapaxes((logm + 4.0) / 4.0, 1, 2)


_LOG_FLOOR = np.log10(np.float32(1e-10))  # log10 of the clamp floor: a frame of exact zeros


def log_mel_numpy(audio: np.ndarray, *, n_mels: int = 80, sample_rate: int = 16000,
                  pad_to_seconds: float | None = 30.0, valid_samples=None) -> np.ndarray:
    """`log_mel` on the host in numpy/scipy (float32, the same steps), for the input pipeline's host option.

    audio `[batch, samples]` -> `[batch, n_mels, frames]` float32. `valid_samples` `[batch]` (optional)
    promises that row b is zero from sample `valid_samples[b]` on; frames whose window lies wholly in that
    zero tail are exact zeros before the log, so they are filled with the log floor instead of computed
    (the result is the same; a 10 s clip in a 30 s window costs a third). Single-threaded: scipy's FFT
    and a sparse filterbank product (no BLAS thread pool spinning inside data-loader threads).
    """
    import scipy.fft

    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2:
        raise AudioError(f"log_mel_numpy expects audio [batch, samples], got shape {audio.shape}; "
                         "add a batch axis with audio[None] for one clip")
    if pad_to_seconds is not None:
        target = window_samples(pad_to_seconds, sample_rate)
        n = audio.shape[1]
        audio = audio[:, :target] if n >= target else np.pad(audio, ((0, 0), (0, target - n)))
    batch, n = audio.shape
    half = N_FFT // 2
    if n <= half:
        raise AudioError(f"audio of {n} samples is too short for log_mel: need more than {half} samples "
                         f"({half / sample_rate * 1000:.1f} ms at {sample_rate} Hz)")
    frames = n // HOP_LENGTH
    fb_t = _filterbank_csr(n_mels, sample_rate)                                   # [n_mels, bins]
    window = _hann(N_FFT)
    out = np.full((batch, n_mels, frames), _LOG_FLOOR, np.float32)
    for b in range(batch):
        used = frames
        if valid_samples is not None:
            v = max(0, int(valid_samples[b]))
            if v <= n - half - 1:  # the right reflection (samples n-201..n-2) is zero too
                used = min(frames, -(-(v + half) // HOP_LENGTH))  # frames before the first one starting at v + 200
        if used == 0:
            continue
        # only the padded prefix the first `used` frames read: [0, (used - 1) * hop + n_fft)
        padded = np.pad(audio[b], (half, half), mode="reflect")[:(used - 1) * HOP_LENGTH + N_FFT]
        win = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH] * window  # [used, n_fft]
        spec = scipy.fft.rfft(win, axis=-1)                                               # [used, bins]
        power = np.square(spec.real) + np.square(spec.imag)
        mel = np.asarray(fb_t @ power.T, np.float32)                                      # [n_mels, used]
        np.log10(np.maximum(mel, np.float32(1e-10)), out=out[b, :, :used])
    np.maximum(out, out.max(axis=(1, 2), keepdims=True) - np.float32(8.0), out=out)
    out += np.float32(4.0)
    out /= np.float32(4.0)
    return out


@functools.lru_cache(maxsize=None)
def _filterbank_csr(n_mels: int, sample_rate: int):
    """The float32 filterbank, transposed `[n_mels, bins]`, as a scipy CSR matrix (each bin feeds <= 2 mels)."""
    import scipy.sparse
    return scipy.sparse.csr_matrix(mel_filterbank(n_mels, sample_rate).astype(np.float32).T)
