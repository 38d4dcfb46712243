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
INPUT_CONVENTIONS = ("native", "alarm")         # EncoderConfig.input_convention: how a clip becomes encoder input


def encoder_frames(num_samples, kind: str = "whisper", convention: str = "native"):
    """Valid encoder frames (50 Hz) for `num_samples` valid 16 kHz samples, by encoder kind and input convention
    (`EncoderConfig.input_convention`); the one place these rules are written (connectors count their audio
    tokens from them). Ints and integer numpy/JAX arrays alike.

    native (the encoder's own extractor, one clip):
      whisper: stride-2 conv over log-mel frames, `ceil((samples // 160) / 2)`.
      w2v_bert: stacked pairs of kaldi fbank frames, `(1 + (samples - 400) // 160) // 2` (0 below 400 samples);
        one frame fewer than Whisper for most lengths (1 s: 49 vs 50).
      clap: one state row per clip (its clip embedding), 0 for an empty clip.
    alarm (Blinorot/ALARM's feature_extractor_implementations):
      whisper: the HF extractor's attention mask counted, `ceil(samples / 160)`, then the encoder's `// 2`
        (whisper.py:47, encoder_implementations/whisper.py:20; over 30 s the 30 s pieces' masks are summed,
        the same count): one frame fewer than native when samples / 160 is an odd integer.
      w2v_bert: the waveform zero-padded by 160 samples on each side first (w2vbert.py:26): the native rule
        on samples + 320, `(1 + (samples - 80) // 160) // 2` (1 s: 50).
      clap: no ALARM convention (an AudioError)."""
    if convention not in INPUT_CONVENTIONS:
        raise AudioError(f"no input convention {convention!r}; known: {INPUT_CONVENTIONS}")
    alarm = convention == "alarm"
    if kind == "whisper":
        if alarm:
            return -(-num_samples // HOP_LENGTH) // 2
        return (num_samples // HOP_LENGTH + 1) // 2
    if kind == "w2v_bert":
        from alm_jax.audio.fbank import ALARM_EDGE_PAD, stacked_frames
        return stacked_frames(num_samples + 2 * ALARM_EDGE_PAD if alarm else num_samples)
    if kind == "clap":
        if alarm:
            raise AudioError("encoder kind 'clap' has no 'alarm' input convention (ALARM has no CLAP encoder); "
                             "use input_convention native")
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

    One program per platform (`lax.platform_dependent`, resolved when lowering): on CPU a loop over chunks of
    frames (`_log10_mel_chunked`: every temporary stays cache-sized and two chunks run concurrently) and a
    banded filterbank product (`_mel_bands`), elsewhere all frames at once (`_log10_mel_whole`) and one
    filterbank matmul. Both give the same values (to float32 rounding of the sums).
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
    bands = _mel_bands(n_mels, sample_rate, _CPU_MEL_BANDS)
    chunk = _cpu_chunk_frames(audio.shape[0], n // HOP_LENGTH)
    cpu = (functools.partial(_log10_mel_whole, bands=bands) if chunk is None
           else functools.partial(_log10_mel_chunked, bands=bands, chunk=chunk))
    whole = functools.partial(_log10_mel_whole, bands=_mel_bands(n_mels, sample_rate, 1))
    logm, peak = jax.lax.platform_dependent(audio, cpu=cpu, default=whole)
    return (jnp.maximum(logm, peak[:, None, None] - 8.0) + 4.0) / 4.0


_BLOCKS = -(-N_FFT // HOP_LENGTH)      # hop-sized blocks one frame spans (3: 160 + 160 + 80 samples)
_CPU_CHUNK_FRAMES = 2048               # frames (all rows together) per CPU chunk: ~3 MB of frames, in cache
_CPU_MEL_BANDS = 2                     # filterbank blocks on CPU (halves the mel matmul; more blocks gain nothing)


@functools.lru_cache(maxsize=None)
def _mel_bands(n_mels: int, sample_rate: int, groups: int) -> tuple[tuple[int, int, np.ndarray], ...]:
    """The transposed filterbank in `groups` blocks of consecutive mels, each cut to the FFT bins its filters
    touch (a triangle covers a few bins, so the blocks skip most of the zeros of the dense matrix):
    `((first_bin, end_bin, weights [mels in block, end_bin - first_bin] float32), ...)`."""
    fb_t = mel_filterbank(n_mels, sample_rate).astype(np.float32).T                # [n_mels, bins]
    bands = []
    for mels in np.array_split(np.arange(n_mels), groups):
        used = np.flatnonzero(fb_t[mels].any(axis=0))
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        block = fb_t[mels, lo:hi]
        block.setflags(write=False)
        bands.append((lo, hi, block))
    return tuple(bands)


def _frames(blocks: jax.Array, count: int) -> jax.Array:
    """Windowed frames from hop-sized blocks of the reflect-padded signal, without a gather.

    blocks `[..., count + 2, hop]` -> `[..., count, n_fft]` float32: frame t is blocks t, t+1 and the first
    n_fft - 2 * hop samples of block t+2 (hop 160, n_fft 400), times the Hann window."""
    parts = [blocks[..., j:j + count, :min(HOP_LENGTH, N_FFT - j * HOP_LENGTH)] for j in range(_BLOCKS)]
    return jnp.concatenate(parts, axis=-1) * _hann(N_FFT)


def _log10_mel_frames(padded: jax.Array, count: int, bands) -> jax.Array:
    """log10 of the clamped mel power of `count` frames, the filterbank given as `_mel_bands`.

    padded `[batch, (count + 2) * hop]` (reflect-padded signal from the first frame's start) ->
    `[batch, n_mels, count]` float32."""
    blocks = padded.reshape(padded.shape[0], count + _BLOCKS - 1, HOP_LENGTH)
    spec = jnp.fft.rfft(_frames(blocks, count), axis=-1)                         # [batch, count, bins]
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    mel = jnp.concatenate([jnp.einsum("mk,bfk->bmf", w, power[..., lo:hi], precision=jax.lax.Precision.HIGHEST)
                           for lo, hi, w in bands], axis=1)                      # [batch, n_mels, count]
    return jnp.log10(jnp.maximum(mel, 1e-10))


def _span(audio: jax.Array, first_frame: int, count: int) -> jax.Array:
    """The reflect-padded signal under frames [first_frame, first_frame + count), padded on the fly.

    audio `[batch, samples]` -> `[batch, (count + 2) * hop]`; padded sample p is audio sample p - n_fft/2,
    reflected at both ends. Only the ends are padded, so nothing of batch size is copied twice."""
    half, n = N_FFT // 2, audio.shape[1]
    start, stop = first_frame * HOP_LENGTH - half, (first_frame + count + _BLOCKS - 1) * HOP_LENGTH - half
    piece = audio[:, max(start, 0):min(stop, n)]
    piece = jnp.pad(piece, ((0, 0), (max(-start, 0), half if stop > n else 0)), mode="reflect")
    return piece[:, :stop - start]


def _log10_mel_whole(audio: jax.Array, bands) -> tuple[jax.Array, jax.Array]:
    """All frames in one batched program (accelerators; short inputs on CPU).

    audio `[batch, samples]` -> (log10 mel `[batch, n_mels, samples // hop]`, per-row max `[batch]`)."""
    frames = audio.shape[1] // HOP_LENGTH
    logm = _log10_mel_frames(_span(audio, 0, frames), frames, bands)
    return logm, logm.max(axis=(1, 2))


def _cpu_chunk_frames(batch: int, frames: int) -> int | None:
    """Frames per row in one CPU chunk: about `_CPU_CHUNK_FRAMES` frames over all rows, at most a quarter of
    the row (at least head, tail and two middle chunks); None when rows are too short to chunk."""
    chunk = max(16, min(_CPU_CHUNK_FRAMES // max(batch, 1), frames // 4))
    return chunk if frames >= 4 * chunk else None


def _log10_mel_chunked(audio: jax.Array, bands, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`_log10_mel_whole` as a loop over chunks of `chunk` frames of every row (CPU).

    The first and last chunks pad the signal's ends; the chunks between read the audio directly (no padded
    copy of the batch). Each loop step computes two chunks, which XLA's CPU runtime runs on two threads (its
    FFT is single-threaded). The last middle chunk is clamped to end where the last chunk starts, so chunks
    may overlap (a frame computed twice, written once). Same shapes and values as `_log10_mel_whole`."""
    batch, n = audio.shape
    frames = n // HOP_LENGTH
    n_mels = sum(w.shape[0] for _, _, w in bands)
    head = _log10_mel_frames(_span(audio, 0, chunk), chunk, bands)                  # [batch, n_mels, chunk]
    tail = _log10_mel_frames(_span(audio, frames - chunk, chunk), chunk, bands)
    middle = -(-(frames - 2 * chunk) // chunk)                                      # chunks between them
    steps = -(-middle // 2)
    width = (chunk + _BLOCKS - 1) * HOP_LENGTH
    last = frames - 2 * chunk                                     # first frame of the last middle chunk

    def middle_chunk(i):
        first = jnp.minimum(chunk + i * chunk, last)
        piece = jax.lax.dynamic_slice_in_dim(audio, first * HOP_LENGTH - N_FFT // 2, width, axis=1)
        return first, _log10_mel_frames(piece, chunk, bands)

    def step(k, carry):
        out, peak = carry
        pair = [middle_chunk(2 * k), middle_chunk(2 * k + 1)]     # independent: computed concurrently
        for first, logm in pair:
            out = jax.lax.dynamic_update_slice_in_dim(out, logm, first, axis=2)
            peak = jnp.maximum(peak, logm.max(axis=(1, 2)))
        return out, peak

    out = jnp.zeros((batch, n_mels, frames), jnp.float32)
    out = jax.lax.dynamic_update_slice_in_dim(out, head, 0, axis=2)
    out = jax.lax.dynamic_update_slice_in_dim(out, tail, frames - chunk, axis=2)
    peak = jnp.maximum(head.max(axis=(1, 2)), tail.max(axis=(1, 2)))
    return jax.lax.fori_loop(0, steps, step, (out, peak))


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
