"""W2V-BERT input features in JAX, equal to `transformers.SeamlessM4TFeatureExtractor` (kaldi-style fbank).

Per clip: scale to 16-bit range (x 32768), frames of 400 samples every 160 (no centering: 1 + (n - 400) // 160
frames), per frame remove the DC offset, pre-emphasis 0.97 (the first sample scaled by 0.03), Povey window
(Hann^0.85, symmetric), |rFFT_512|^2, 80 triangular filters on the kaldi mel scale (20 Hz - 8 kHz, no
normalization), floor 1.1920929e-07, natural log; then per mel bin zero mean / unit variance over the clip's
frames (unbiased variance + 1e-7). Padding frames are 0; frames are padded to an even count and stacked in
pairs -> `[frames / 2, 160]` at 50 Hz; a stacked frame is valid when its second half is a real frame.

`edge_pad` (ALARM's input convention, `EncoderConfig.input_convention: alarm`: `ALARM_EDGE_PAD` = 160) zero-pads
each clip by that many samples on both sides first, as ALARM's W2V-BERT feature extractor does
(feature_extractor_implementations/w2vbert.py:26): the padding is part of the clip (normalization statistics,
frames), so a clip of n samples has the frames of n + 2 * edge_pad.

Two implementations of the same steps:
- `w2v_bert_features` (JAX, float32, batched, static shapes, jit-able: the on-device path of the ALM). A float32
  FFT resolves about 120 dB below a frame's peak; bins quieter than that (the 7-8 kHz bands of pure synthetic
  tones, ~140 dB down) come out of its roundoff, so there the normalized features can differ from the
  float64 extractor by up to ~0.3 (espeak-ng speech: typically 3e-5 to 1e-4, at most ~2e-3 measured).
- `w2v_bert_features_numpy` (host, float64 FFT and filterbank like the extractor; agrees with it to ~1e-6 on
  any audio): the reference, and the host-side option.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alm_jax.errors import AudioError

FRAME_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07
STRIDE = 2
ALARM_EDGE_PAD = 160   # samples of zeros ALARM puts on both sides of a clip before the extractor


def fbank_frames(num_samples):
    """Fbank frames of `num_samples` samples: 1 + (n - 400) // 160, 0 below 400 (ints or integer arrays)."""
    return (num_samples >= FRAME_LENGTH) * ((num_samples - FRAME_LENGTH) // HOP_LENGTH + 1)


def stacked_frames(num_samples):
    """Valid W2V-BERT input frames (stacked fbank pairs) for `num_samples` valid samples: fbank_frames // 2."""
    return fbank_frames(num_samples) // STRIDE


@functools.lru_cache(maxsize=None)
def kaldi_mel_filters(n_mels: int = 80, sample_rate: int = 16000, n_fft: int = FFT_LENGTH,
                      fmin: float = 20.0) -> np.ndarray:
    """Triangular filters `[n_fft // 2 + 1, n_mels]` float64, built in kaldi mel space (1127 ln(1 + f/700)):
    FFT bin centers and band edges both on the mel axis, no area normalization."""
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
    edges = np.linspace(mel(fmin), mel(sample_rate // 2), n_mels + 2)
    bins = mel(sample_rate / n_fft * np.arange(n_fft // 2 + 1))
    width = np.diff(edges)
    dist = edges[None, :] - bins[:, None]                              # [bins, n_mels + 2]
    fb = np.maximum(0.0, np.minimum(-dist[:, :-2] / width[:-1], dist[:, 2:] / width[1:]))
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=None)
def povey_window(n: int = FRAME_LENGTH) -> np.ndarray:
    """Kaldi's Povey window: the symmetric Hann window to the power 0.85, float64."""
    window = np.power(np.hanning(n), 0.85)
    window.setflags(write=False)
    return window


def log_fbank(audio: jax.Array, *, n_mels: int = 80, sample_rate: int = 16000) -> jax.Array:
    """Kaldi log-mel fbank of audio `[batch, samples]` (float, full scale 1.0) -> `[batch, frames, n_mels]`
    float32, frames = 1 + (samples - 400) // 160 (unnormalized)."""
    audio = jnp.asarray(audio, jnp.float32)
    n = audio.shape[1]
    frames = int(fbank_frames(n))
    idx = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(FRAME_LENGTH)[None, :]
    x = (audio * 32768.0)[:, idx]                                             # [batch, frames, 400]
    x = x - x.mean(axis=-1, keepdims=True)
    x = jnp.concatenate([x[..., :1] * (1.0 - PREEMPHASIS), x[..., 1:] - PREEMPHASIS * x[..., :-1]], axis=-1)
    x = x * jnp.asarray(povey_window(), jnp.float32)
    spec = jnp.fft.rfft(x, n=FFT_LENGTH, axis=-1)
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    fb = jnp.asarray(kaldi_mel_filters(n_mels, sample_rate), jnp.float32)
    mel = jnp.matmul(power, fb, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, MEL_FLOOR))


def _edge_padded(audio, valid_samples, edge_pad: int, xp):
    """Each clip of `audio` `[batch, samples]` (zero after its end) with `edge_pad` zeros on both sides, and
    its valid samples (None: all): the buffer shifted right by `edge_pad`, `2 edge_pad` longer."""
    if edge_pad < 0:
        raise AudioError(f"edge_pad={edge_pad} must be >= 0 (samples of zeros on each side of a clip; ALARM: "
                         f"{ALARM_EDGE_PAD})")
    if edge_pad == 0:
        return audio, valid_samples
    if valid_samples is None:
        valid_samples = xp.full((audio.shape[0],), audio.shape[1])
    return xp.pad(audio, ((0, 0), (edge_pad, edge_pad))), xp.asarray(valid_samples) + 2 * edge_pad


def w2v_bert_features(audio, valid_samples=None, *, n_mels: int = 80, sample_rate: int = 16000,
                      edge_pad: int = 0) -> tuple[jax.Array, jax.Array]:
    """SeamlessM4TFeatureExtractor in JAX (see the module doc).

    audio `[batch, samples]` float (zero after each clip's end), valid_samples `[batch]` int (default: all
    samples) -> (input_features `[batch, ceil(F / 2), 2 n_mels]` float32, attention_mask `[batch, ceil(F / 2)]`
    bool), F = fbank frames of `samples + 2 edge_pad`. Row b equals the extractor's output for clip b alone
    (with `edge_pad` zeros on each side), padded (zeros, mask False) to the batch's length, as the extractor
    pads a batch to its longest clip."""
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim != 2:
        raise AudioError(f"w2v_bert_features expects audio [batch, samples], got shape {audio.shape}; "
                         "add a batch axis with audio[None] for one clip")
    audio, valid_samples = _edge_padded(audio, valid_samples, edge_pad, jnp)
    if audio.shape[1] < FRAME_LENGTH:
        raise AudioError(f"audio of {audio.shape[1]} samples is too short for the fbank: need at least "
                         f"{FRAME_LENGTH} samples ({FRAME_LENGTH / sample_rate * 1000:.0f} ms at {sample_rate} Hz)")
    b = audio.shape[0]
    feats = log_fbank(audio, n_mels=n_mels, sample_rate=sample_rate)          # [batch, F, n_mels]
    total = feats.shape[1]
    n = jnp.full((b,), audio.shape[1]) if valid_samples is None else jnp.asarray(valid_samples)
    count = fbank_frames(n)                                                   # [batch] frames per clip
    valid = jnp.arange(total)[None, :] < count[:, None]                       # [batch, F]
    w = valid[..., None].astype(jnp.float32)
    c = jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]
    mean = (feats * w).sum(axis=1, keepdims=True) / c
    var = (jnp.square(feats - mean) * w).sum(axis=1, keepdims=True) / jnp.maximum(c - 1.0, 1.0)
    feats = jnp.where(valid[..., None], (feats - mean) / jnp.sqrt(var + 1e-7), 0.0)
    if total % STRIDE:
        feats = jnp.pad(feats, ((0, 0), (0, STRIDE - total % STRIDE), (0, 0)))
    t = feats.shape[1] // STRIDE
    mask = jnp.arange(t)[None, :] < (count // STRIDE)[:, None]
    return feats.reshape(b, t, STRIDE * n_mels), mask


def w2v_bert_features_numpy(audio, valid_samples=None, *, n_mels: int = 80, sample_rate: int = 16000,
                            edge_pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`w2v_bert_features` on the host in numpy float64 (the extractor's precision: its spectrum is rounded
    to complex64 and its log-mel to float32, as here). Same arguments and outputs, as numpy arrays."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2:
        raise AudioError(f"w2v_bert_features_numpy expects audio [batch, samples], got shape {audio.shape}; "
                         "add a batch axis with audio[None] for one clip")
    audio, valid_samples = _edge_padded(audio, valid_samples, edge_pad, np)
    if audio.shape[1] < FRAME_LENGTH:
        raise AudioError(f"audio of {audio.shape[1]} samples is too short for the fbank: need at least "
                         f"{FRAME_LENGTH} samples ({FRAME_LENGTH / sample_rate * 1000:.0f} ms at {sample_rate} Hz)")
    b, n = audio.shape
    total = int(fbank_frames(n))
    t = -(-total // STRIDE)
    counts = np.full(b, total) if valid_samples is None else fbank_frames(np.asarray(valid_samples, np.int64))
    out = np.zeros((b, t * STRIDE, n_mels), np.float32)
    fb = kaldi_mel_filters(n_mels, sample_rate)
    window = povey_window()
    for i in range(b):
        f = int(counts[i])
        if f == 0:
            continue
        x = audio[i].astype(np.float64) * 32768.0
        frames = np.lib.stride_tricks.sliding_window_view(x, FRAME_LENGTH)[::HOP_LENGTH][:f].copy()
        frames -= frames.mean(axis=-1, keepdims=True)
        frames[:, 1:] -= PREEMPHASIS * frames[:, :-1]
        frames[:, 0] *= 1.0 - PREEMPHASIS
        spec = np.fft.rfft(frames * window, n=FFT_LENGTH, axis=-1).astype(np.complex64)
        power = np.abs(spec, dtype=np.float64) ** 2
        feats = np.log(np.maximum(MEL_FLOOR, power @ fb)).astype(np.float32)       # [f, n_mels]
        var = feats.var(0, ddof=1) if f > 1 else np.zeros(n_mels, np.float32)
        out[i, :f] = (feats - feats.mean(0)[None]) / np.sqrt(var[None] + 1e-7)
    mask = np.arange(t)[None, :] < (counts // STRIDE)[:, None]
    return out.reshape(b, t, STRIDE * n_mels), mask
