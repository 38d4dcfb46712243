"""CLAP input features on the host (numpy, float64 STFT), equal to `transformers.ClapFeatureExtractor`.

    clip (48 kHz mono) -> [repeat/pad to max_length, or crop] -> |rfft(hann 1024, hop 480, centre reflect pad)|^2
      -> mel filters (64 bins, 0..14 kHz) -> 10 log10(max(., 1e-10)) -> `[frames, 64]` float32

truncation "rand_trunc" (laion/clap-htsat-unfused): Slaney mel filters; a clip longer than max_length is cropped
at a random offset -> input_features `[batch, 1, frames, 64]`, is_longer True for cropped clips.
truncation "fusion" (laion/clap-htsat-fused): HTK mel filters; a longer clip gives 4 channels: the whole mel
shrunk to `frames` rows (bilinear) + 3 random crops from the front, middle and back thirds; a shorter clip
(padded) its mel 4 times -> `[batch, 4, frames, 64]`. As in HF, when no clip of the batch is longer, one random
row is marked is_longer anyway (the model then fuses 4 identical copies for it).

Randomness comes from `rng` (a `np.random.RandomState` or the `np.random` module, called exactly like HF calls the
global numpy state: `randint` per cropped clip, `choice` x3 per fused clip, then `randint` for the fallback
row), so `rng=np.random.RandomState(s)` reproduces HF after `np.random.seed(s)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from alm_jax.errors import AudioError

TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")


@dataclasses.dataclass(frozen=True)
class ClapFeatureSettings:
    """HF `ClapFeatureExtractor` settings (defaults = HF's = the LAION checkpoints' preprocessor_config.json)."""
    feature_size: int = 64
    sampling_rate: int = 48000
    hop_length: int = 480
    max_length_s: int = 10
    fft_window_size: int = 1024
    frequency_min: float = 0.0
    frequency_max: float = 14000.0
    top_db: float | None = None
    truncation: str = "fusion"
    padding: str = "repeatpad"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise AudioError(f"clap features: truncation={self.truncation!r} is not one of {TRUNCATIONS}")
        if self.padding not in PADDINGS:
            raise AudioError(f"clap features: padding={self.padding!r} is not one of {PADDINGS}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ClapFeatureSettings":
        """From an HF `preprocessor_config.json` dict (missing keys take HF's defaults)."""
        kw = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
        return cls(**kw)

    @property
    def max_samples(self) -> int:
        return int(self.max_length_s * self.sampling_rate)


def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    logstep = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * logstep, 3.0 * f / 200.0)


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if scale == "htk":
        return 700.0 * (np.power(10, m / 2595.0) - 1.0)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(s: ClapFeatureSettings, slaney: bool) -> np.ndarray:
    """`[fft_window_size // 2 + 1, feature_size]` float64 triangular filters: HTK scale without norm ("fusion"),
    or Slaney scale with Slaney area norm ("rand_trunc"), as HF's `mel_filter_bank`."""
    scale = "slaney" if slaney else "htk"
    n_freq, n_mel = s.fft_window_size // 2 + 1, s.feature_size
    mels = np.linspace(_hz_to_mel(s.frequency_min, scale), _hz_to_mel(s.frequency_max, scale), n_mel + 2)
    edges = _mel_to_hz(mels, scale)
    fft_freqs = np.linspace(0, s.sampling_rate // 2, n_freq)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    fb = np.maximum(0.0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    if slaney:
        fb = fb * (2.0 / (edges[2:n_mel + 2] - edges[:n_mel]))[None, :]
    return fb


def log_mel(wave: np.ndarray, s: ClapFeatureSettings, filters: np.ndarray) -> np.ndarray:
    """One clip `[samples]` -> `[frames, feature_size]` float32 dB (HF `spectrogram(..., log_mel="dB")`)."""
    n = s.fft_window_size
    x = np.pad(np.asarray(wave, np.float64), (n // 2, n // 2), mode="reflect")
    frames = 1 + (x.size - n) // s.hop_length
    idx = np.arange(n)[None, :] + s.hop_length * np.arange(frames)[:, None]
    window = np.hanning(n + 1)[:-1]                                           # periodic Hann
    spec = np.fft.rfft(x[idx] * window, axis=-1).astype(np.complex64)          # HF stores complex64
    power = np.abs(spec, dtype=np.float64) ** 2
    mel = np.maximum(1e-10, power @ filters)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    if s.top_db is not None:
        db = np.maximum(db, db.max() - s.top_db)
    return db.astype(np.float32)


def bilinear_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """torch `interpolate(mode="bilinear", align_corners=False)` of `[T, F]` float32 to `[rows, F]` (the
    feature axis keeps its size, so only rows are interpolated), in float32 as torch computes it."""
    t = x.shape[0]
    scale = np.float32(t / rows)
    src = np.maximum(scale * (np.arange(rows, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, t - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)[:, None]
    x = x.astype(np.float32)
    return ((np.float32(1) - lam) * x[i0] + lam * x[i1]).astype(np.float32)


def _one(wave: np.ndarray, s: ClapFeatureSettings, truncation: str, padding: str, max_len: int, rng,
         fb: dict) -> tuple[np.ndarray, bool]:
    if wave.shape[0] > max_len:
        if truncation == "rand_trunc":
            start = rng.randint(0, wave.shape[0] - max_len + 1)
            return log_mel(wave[start:start + max_len], s, fb["slaney"])[None], True
        mel = log_mel(wave, s, fb["htk"])
        chunk = max_len // s.hop_length + 1
        total = mel.shape[0]
        if chunk == total:
            return np.stack([mel] * 4), False
        ranges = np.array_split(list(range(0, total - chunk + 1)), 3)
        ranges = [ranges[0]] + [r if len(r) else [0] for r in ranges[1:]]
        starts = [rng.choice(r) for r in ranges]
        crops = [mel[i:i + chunk] for i in starts]
        return np.stack([bilinear_rows(mel, chunk)] + crops), True
    if wave.shape[0] < max_len:
        if padding == "repeat":
            wave = np.tile(wave, int(max_len / len(wave)) + 1)[:max_len]
        elif padding == "repeatpad":
            wave = np.tile(wave, int(max_len / len(wave)))
        wave = np.pad(wave, (0, max_len - wave.shape[0]))
    if truncation == "fusion":
        return np.stack([log_mel(wave, s, fb["htk"])] * 4), False
    return log_mel(wave, s, fb["slaney"])[None], False


def clap_features(clips: Sequence[np.ndarray] | np.ndarray, settings: ClapFeatureSettings = ClapFeatureSettings(), *,
                  truncation: str | None = None, padding: str | None = None, max_length: int | None = None,
                  rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Clips (each `[samples]` at `settings.sampling_rate`; a list, or a `[batch, samples]` array) ->
    (input_features `[batch, 1 or 4, frames, feature_size]` float32, is_longer `[batch, 1]` bool)."""
    s = dataclasses.replace(settings, **{k: v for k, v in (("truncation", truncation), ("padding", padding))
                                         if v is not None})
    rng = np.random if rng is None else rng
    clips = [clips] if isinstance(clips, np.ndarray) and clips.ndim == 1 else list(clips)
    if not clips:
        raise AudioError("clap features: no clips given")
    max_len = int(max_length or s.max_samples)
    fb = {"htk": mel_filters(s, slaney=False), "slaney": mel_filters(s, slaney=True)}
    mels, longer = [], []
    for c in clips:
        c = np.asarray(c, np.float64)
        if c.ndim != 1 or c.size == 0:
            raise AudioError(f"clap features: each clip must be mono `[samples]` and non-empty, got shape {c.shape}")
        m, lg = _one(c, s, s.truncation, s.padding, max_len, rng, fb)
        mels.append(m)
        longer.append(lg)
    if s.truncation == "fusion" and not any(longer):
        longer[rng.randint(0, len(mels))] = True
    return np.stack(mels).astype(np.float32), np.asarray(longer, bool)[:, None]
