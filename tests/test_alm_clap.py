"""CLAP as an ALM encoder (`EncoderConfig.kind: clap`): on-device features from 16 kHz waveforms against the host
extractor on scipy-resampled audio, the tower's clip embedding against `transformers` `get_audio_features`, the
one-row frame rule, and a MATS model (CLAP embedding -> mapper -> LLM) overfitting a batch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import torch
from flax import nnx
from test_alm import CONNECTORS, clips, overfit, tiny_llm
from test_clap import save_tiny_clap
from transformers import ClapFeatureExtractor

from alm_jax.audio.clap_device import clap_features_16k, resample_filter, upsample
from alm_jax.audio.clap_features import ClapFeatureSettings, clap_features
from alm_jax.audio.features import encoder_frames
from alm_jax.config import EncoderConfig
from alm_jax.errors import ConfigError
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.weights.clap_params import load_clap_audio

SR = 16000
DB_TOL = 2e-3   # dB, on bins within 80 dB of the clip's peak: float32 STFT vs the extractor's float64
FLOOR_TOL = 0.05   # dB, everywhere (bins ~105 dB under the peak hold only float32's few digits)
TINY_FEATURES = dict(feature_size=8, sampling_rate=48000, hop_length=480, max_length_s=1, fft_window_size=1024)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _speechlike(seconds, seed):
    """A voiced-speech-like test signal: a gliding harmonic source with a formant-ish envelope, plus noise."""
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.2 * x / np.abs(x).max() + 0.01 * r.standard_normal(t.size)).astype(np.float32)


def test_upsampler_is_resample_poly():
    x = _speechlike(0.7, 0)
    y = np.asarray(upsample(jnp.asarray(x)[None]))[0]
    ref = scipy.signal.resample_poly(x.astype(np.float64), 3, 1)
    assert y.shape == ref.shape and np.abs(y - ref).max() < 1e-6
    assert abs(resample_filter().sum() - 3.0) < 1e-12


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_device_features_match_the_extractor_on_resampled_audio(truncation):
    s = ClapFeatureSettings(truncation=truncation)
    lengths = [int(SR * 2.3), int(SR * 0.6), int(SR * 10.5)]    # repeat-padded twice, many times, and cut
    buf = np.zeros((3, max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        buf[i, :n] = _speechlike(n / SR, i)
    buf[1, lengths[1]:] = 0.5     # junk past a clip's valid samples must not reach its features
    ours = np.asarray(clap_features_16k(jnp.asarray(buf), jnp.asarray(lengths), s, fused=truncation == "fusion"))
    hf = ClapFeatureExtractor(truncation=truncation)
    for i, n in enumerate(lengths):
        wave = scipy.signal.resample_poly(buf[i, :n].astype(np.float64), 3, 1)[:s.max_samples]
        host, longer = clap_features([wave], s)
        ref = hf(wave, sampling_rate=48000, return_tensors="np")["input_features"]
        assert np.array_equal(host, ref)     # the host twin is the extractor itself
        assert ours[i].shape == host[0].shape
        diff = np.abs(ours[i] - host[0])
        loud = host[0] > host[0].max() - 80.0
        assert diff[loud].max() < DB_TOL and diff.max() < FLOOR_TOL


def _tiny_tower(tmp_path, fusion):
    hf = save_tiny_clap(tmp_path, fusion=fusion)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**TINY_FEATURES, "truncation": "fusion" if fusion else "rand_trunc", "padding": "repeatpad",
         "feature_extractor_type": "ClapFeatureExtractor"}))
    return hf, load_clap_audio(tmp_path)


@pytest.mark.parametrize("fusion", [False, True])
def test_tower_embedding_matches_transformers(tmp_path, fusion):
    hf, tower = _tiny_tower(tmp_path, fusion)
    lengths = [int(SR * 0.45), int(SR * 0.8)]
    buf = np.zeros((2, max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        buf[i, :n] = _speechlike(n / SR, 10 + i)
    ours = np.asarray(nnx.jit(lambda t, a, s: t(a, s))(tower, jnp.asarray(buf), jnp.asarray(lengths)))
    fx = ClapFeatureExtractor(**TINY_FEATURES, truncation="fusion" if fusion else "rand_trunc")
    waves = [scipy.signal.resample_poly(buf[i, :n].astype(np.float64), 3, 1) for i, n in enumerate(lengths)]
    feats = fx(waves, sampling_rate=48000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        kw = {"is_longer": torch.zeros((2, 1), dtype=torch.bool)} if fusion else {}
        ref = hf.get_audio_features(feats, **kw)
    ref = getattr(ref, "pooler_output", ref).numpy()
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)   # normalised, as get_audio_features' doc says
    assert ours.shape == (2, 12) and np.abs(ours - ref).max() < 1e-4


def test_clap_frame_rule_and_kind_check(tmp_path):
    n = np.array([0, 1, 8000, 480000])
    np.testing.assert_array_equal(encoder_frames(n, "clap"), [0, 1, 1, 1])
    assert encoder_frames(16000, "clap") == 1
    _, tower = _tiny_tower(tmp_path, False)
    with pytest.raises(ConfigError, match="kind"):
        AudioLanguageModel([tower], tiny_llm(0), CONNECTORS["mats"], [EncoderConfig(kind="whisper")],
                           rngs=nnx.Rngs(0))


def test_mats_on_clap_overfits_a_batch(tmp_path):
    _, tower = _tiny_tower(tmp_path, False)
    model = AudioLanguageModel([tower], tiny_llm(0), CONNECTORS["mats"],
                               [EncoderConfig(kind="clap", taps=(-1,), tap_indexing="hf", pad_to_seconds=None)],
                               rngs=nnx.Rngs(10))
    states = model.encoder_states(0, jnp.asarray(np.stack(clips(2))), audio_samples=jnp.asarray([8000, 4000]))
    assert len(states) == 1 and states[0].shape == (2, 1, 12)
    assert model.num_audio_tokens(8000) == 4
    losses = overfit(model)
    assert losses[-1] < 0.05, losses[::20]
