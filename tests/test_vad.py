"""The energy VAD gate (alm_jax.audio.vad) on espeak-ng speech, silence, stationary noise and padding."""

import jax
import numpy as np
import pytest

from alm_jax.audio import synth
from alm_jax.audio.vad import energy_vad, frame_levels_db, transcript_or_space
from alm_jax.errors import AudioError

SR = 16000
needs_speech = pytest.mark.skipif(not synth.speech_available(),
                                  reason="no espeak-ng backend (pip install espeakng-loader)")


def _pad(x: np.ndarray, seconds: float) -> np.ndarray:
    """x placed 0.5 s into `seconds` of zeros."""
    out = np.zeros(int(seconds * SR), np.float32)
    out[SR // 2: SR // 2 + len(x)] = x[: len(out) - SR // 2]
    return out


@pytest.fixture(scope="module")
def speech():
    if not synth.speech_available():
        pytest.skip(synth.speech_backend_description())
    x = synth.synthesize_speech("Turn left at the second traffic light.", voice="en+m3")
    return 0.3 * x / np.abs(x).max()


@needs_speech
def test_speech_passes_and_silence_and_stationary_noise_do_not(speech):
    rng = np.random.default_rng(0)
    secs = 4.0
    n = int(secs * SR)
    clean = _pad(speech, secs)
    noise = lambda kind: synth.synthesize_background(kind, secs, SR, rng)   # noqa: E731
    clips = {
        "speech over silence": clean,
        "speech over white noise, SNR 10 dB": synth.mix_at_snr(clean, noise("white noise"), 10.0),
        "speech over hum, SNR 5 dB": synth.mix_at_snr(clean, noise("hum"), 5.0),
        "silence": np.zeros(n, np.float32),
        "white noise -20 dBFS": 0.1 * synth.synthesize_background("white noise", secs, SR, rng),
        "pink noise -10 dBFS": 0.3 * synth.synthesize_background("pink noise", secs, SR, rng),
        "hum": 0.2 * synth.synthesize_background("hum", secs, SR, rng),
        "speech at -70 dBFS (inaudible)": clean * 10 ** (-60 / 20),
    }
    want = [True, True, True, False, False, False, False, False]
    got = np.asarray(jax.jit(energy_vad)(np.stack(list(clips.values()))))
    assert got.tolist() == want, dict(zip(clips, got.tolist()))
    assert transcript_or_space(got[:4], ["a", "b", "c", "d"]) == ["a", "b", "c", " "]


@needs_speech
def test_padding_after_valid_samples_is_ignored(speech):
    secs = 6.0
    x = _pad(speech, secs)
    # the speech lies in [0.5 s, 0.5 s + len]; only 0.4 s valid -> silence; all valid -> speech
    valid = np.array([int(0.4 * SR), len(x)])
    assert np.asarray(energy_vad(np.stack([x, x]), valid)).tolist() == [False, True]
    levels, ok = frame_levels_db(x[None], [int(0.4 * SR)])
    assert ok.sum() == 13 and levels.shape == (1, 200)


def test_frame_levels_and_errors():
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR).astype(np.float32)
    levels, _ = frame_levels_db(tone[None])
    np.testing.assert_allclose(np.asarray(levels), 20 * np.log10(0.5 / np.sqrt(2)), atol=0.05)   # -9 dBFS
    assert not bool(energy_vad(tone[None])[0])   # steady: no frame stands above its own floor
    with pytest.raises(AudioError, match="clips, samples"):
        energy_vad(tone)
    with pytest.raises(AudioError, match="shorter than one"):
        energy_vad(tone[None, :100])
