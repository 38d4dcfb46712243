"""`alm_jax.audio.log_mel` against `transformers.WhisperFeatureExtractor` (constructed offline)."""

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from alm_jax.audio import log_mel
from alm_jax.audio.features import mel_filterbank, num_frames
from alm_jax.errors import AudioError

SR = 16000
TOL = 1e-3


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """[2, samples]: a loud clip (noise + two sines) and a 40 dB quieter one, so the per-example
    dynamic-range floor differs between the two rows."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t + 1.0)
    loud = tone + 0.05 * rng.standard_normal(n)
    quiet = 0.01 * (np.sin(2 * np.pi * 220 * t) + 0.3 * rng.standard_normal(n))
    return np.stack([loud, quiet]).astype(np.float32)


@pytest.fixture(scope="module", params=[80, 128])
def extractor(request):
    return WhisperFeatureExtractor(feature_size=request.param, sampling_rate=SR)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filterbank_matches_transformers(n_mels):
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=SR, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filterbank(n_mels, SR), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seconds", [1.0, 7.3, 30.0, 31.0])
def test_padded_30s_matches_extractor(extractor, seconds):
    x = _audio(seconds)
    ref = extractor(x, sampling_rate=SR, return_tensors="np")["input_features"]
    out = np.asarray(log_mel(x, n_mels=extractor.feature_size))
    assert out.shape == ref.shape == (2, extractor.feature_size, 3000)
    assert np.abs(out - ref).max() <= TOL
    if seconds < 30:  # the zero padding hits the floor, which is per example: its own max - 8 (= 2 after scaling)
        for row in out:
            assert abs(row.min() - (row.max() - 2.0)) < 1e-5
        assert out[1].max() < out[0].max() - 0.5


@pytest.mark.parametrize("seconds", [1.0, 7.3])
def test_unpadded_matches_extractor_do_not_pad(extractor, seconds):
    x = _audio(seconds, seed=1)
    ref = extractor(x, sampling_rate=SR, padding="do_not_pad", return_tensors="np")["input_features"]
    out = np.asarray(log_mel(x, n_mels=extractor.feature_size, pad_to_seconds=None))
    frames = num_frames(x.shape[1], pad_to_seconds=None)
    assert out.shape == ref.shape == (2, extractor.feature_size, frames) and frames == x.shape[1] // 160
    assert np.abs(out - ref).max() <= TOL


def test_batch_rows_are_independent():
    x = _audio(7.3, seed=2)
    both = np.asarray(log_mel(x))
    for i in range(2):
        np.testing.assert_allclose(both[i], np.asarray(log_mel(x[i:i + 1]))[0], atol=1e-6)


def test_bad_input_raises_audio_error():
    with pytest.raises(AudioError, match="batch, samples"):
        log_mel(np.zeros(16000, np.float32))
    with pytest.raises(AudioError, match="too short"):
        log_mel(np.zeros((1, 100), np.float32), pad_to_seconds=None)
