"""CLAP input features on device (JAX), from the pipeline's 16 kHz waveforms, for CLAP as an ALM encoder.

    audio `[N, S]` at 16 kHz, samples `[N]` valid
      --x3 polyphase resampling (windowed-sinc low-pass, scipy `resample_poly(x, 3, 1)`'s filter)--> 48 kHz
      --"repeatpad" to the window (tile the clip floor(window / length) times, zero-pad the rest); a clip longer
        than the window keeps its first window of samples--> `[N, window]`
      --|rfft(hann 1024, hop 480, centred reflect pad)|^2 @ mel filters -> 10 log10(max(., 1e-10))-->
    `[N, channels, frames, n_mels]` float32 (channels 4 for a fused checkpoint: the same mel 4 times, as the
    extractor gives a clip that fits the window; is_longer is False for every clip).

Differences from `ClapFeatureExtractor` (`alm_jax.audio.clap_features` is its exact host twin): the input is
resampled here; clips longer than the window are cut to their first window (the extractor crops at a random
offset, or fuses random crops) so training and evaluation see the same features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alm_jax.audio.clap_features import ClapFeatureSettings, mel_filters
from alm_jax.errors import AudioError

UP = 3   # 16 kHz -> 48 kHz


@functools.lru_cache(maxsize=None)
def resample_filter(up: int = UP, beta: float = 5.0) -> np.ndarray:
    """scipy `resample_poly(x, up, 1)`'s default filter: `firwin(20 * up + 1, 1 / up, window=("kaiser", 5.0))`
    times `up` (a Kaiser-windowed sinc, unit DC gain before the gain `up`), float64 `[20 * up + 1]`."""
    half = 10 * up
    n = np.arange(-half, half + 1)
    h = np.sinc(n / up) / up * np.kaiser(2 * half + 1, beta)
    return h / h.sum() * up


def upsample(audio: jax.Array, up: int = UP) -> jax.Array:
    """`[N, S]` -> `[N, S * up]`: zero-stuffing then the low-pass filter, aligned as `resample_poly` aligns it."""
    n, s = audio.shape
    h = jnp.asarray(resample_filter(up), jnp.float32)
    stuffed = jnp.zeros((n, s * up), jnp.float32).at[:, ::up].set(audio.astype(jnp.float32))
    half = (h.shape[0] - 1) // 2
    y = jax.lax.conv_general_dilated(stuffed[:, None, :], h[::-1][None, None, :], (1,), [(half, half)],
                                     precision=jax.lax.Precision.HIGHEST)
    return y[:, 0, :]


def repeat_pad(wave: jax.Array, valid: jax.Array, window: int) -> jax.Array:
    """`[N, L]` clips with `valid [N]` samples -> `[N, window]`: each clip tiled floor(window / valid) times then
    zero-padded (HF "repeatpad"); a clip at least `window` long keeps its first `window` samples."""
    idx = jnp.arange(window)[None, :]
    valid = jnp.maximum(valid.astype(jnp.int32), 1)[:, None]
    repeats = jnp.maximum(window // valid, 1)
    keep = idx < repeats * valid
    src = jnp.where(keep, idx % valid, 0)
    if wave.shape[1] < window:
        wave = jnp.pad(wave, ((0, 0), (0, window - wave.shape[1])))
    return jnp.where(keep, jnp.take_along_axis(wave, src, axis=1), 0.0)


def log_mel_db(wave: jax.Array, settings: ClapFeatureSettings, filters: np.ndarray) -> jax.Array:
    """`[N, samples]` at the settings' rate -> `[N, frames, n_mels]` dB, float32 (the host `log_mel`)."""
    n_fft, hop = settings.fft_window_size, settings.hop_length
    x = jnp.pad(wave.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = 1 + (x.shape[1] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = jnp.asarray(np.hanning(n_fft + 1)[:-1], jnp.float32)
    spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2
    mel = jnp.einsum("ntf,fm->ntm", power, jnp.asarray(filters, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    db = 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))
    if settings.top_db is not None:
        db = jnp.maximum(db, db.max(axis=(1, 2), keepdims=True) - settings.top_db)
    return db


def clap_features_16k(audio: jax.Array, samples: jax.Array, settings: ClapFeatureSettings, *,
                      fused: bool) -> jax.Array:
    """audio `[N, S]` at 16 kHz + valid `samples [N]` -> input_features `[N, 4 if fused else 1, frames, n_mels]`
    (frames = 1 + window // hop) for a CLAP audio tower whose extractor runs at `settings.sampling_rate`."""
    if audio.ndim != 2:
        raise AudioError(f"clap features expect audio [N, samples], got shape {audio.shape}")
    if settings.sampling_rate != 16000 * UP:
        raise AudioError(f"clap features on device resample 16 kHz by {UP}; this checkpoint's extractor runs at "
                         f"{settings.sampling_rate} Hz, which is not supported")
    valid = jnp.arange(audio.shape[1])[None, :] < samples[:, None]
    wave = upsample(jnp.where(valid, audio.astype(jnp.float32), 0.0), UP)   # nothing past a clip leaks into it
    wave = repeat_pad(wave, samples * UP, settings.max_samples)
    mel = log_mel_db(wave, settings, mel_filters(settings, slaney=not fused))
    return jnp.repeat(mel[:, None], 4 if fused else 1, axis=1)
