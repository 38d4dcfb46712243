"""alm_jax.audio.io: encode/decode round trips, resampling quality, and one test per bad-audio kind."""

import io

import numpy as np
import pytest
import soundfile as sf

from alm_jax.audio import io as aio
from alm_jax.errors import AudioError


def _tone(freq, sr, seconds, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _kind(fn, *args, **kwargs):
    with pytest.raises(AudioError) as e:
        fn(*args, **kwargs)
    return e.value.kind


@pytest.mark.parametrize("fmt", ["flac", "pcm16"])
def test_round_trip_is_16bit_exact(fmt):
    x = _tone(440, 16000, 1.0)
    data = aio.encode_audio(x, 16000, fmt)
    assert aio.audio_info(data) == (16000, 16000, 1)
    y = aio.decode_audio(data, target_sr=16000)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1.0 / 32768)
    # Quantized input survives encode -> decode bit for bit.
    assert np.array_equal(aio.decode_audio(aio.encode_audio(y, 16000, fmt)), y)


def test_stereo_is_averaged_to_mono():
    left, right = _tone(300, 8000, 0.5), _tone(500, 8000, 0.5, amp=0.25)
    data = aio.encode_audio(np.stack([left, right], axis=1), 8000)
    np.testing.assert_allclose(aio.decode_audio(data), (left + right) / 2, atol=2.0 / 32768)
    assert aio.decode_audio(data, mono=False).shape == (4000, 2)


def test_resample_keeps_passband_and_removes_aliases():
    sr_in, sr_out = 44100, 16000
    y = aio.decode_audio(aio.encode_audio(_tone(1000, sr_in, 1.0), sr_in), target_sr=sr_out)
    assert y.shape == (sr_out,)
    mid = slice(1000, -1000)  # away from the filter's edge transients
    np.testing.assert_allclose(y[mid], _tone(1000, sr_out, 1.0)[mid], atol=2e-3)
    # 11 kHz is above the new Nyquist (8 kHz): a band-limited resampler removes it, naive decimation aliases it.
    alias = aio.resample(_tone(11000, sr_in, 1.0), sr_in, sr_out)
    assert np.sqrt(np.mean(alias[mid] ** 2)) < 1e-3


def test_read_audio_file_span(tmp_path):
    x = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)
    path = tmp_path / "a.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    w = aio.read_audio_file(path, start=0.5, end=1.25)
    assert w.sample_rate == 8000 and w.samples.shape == (6000, 1)
    np.testing.assert_array_equal(w.samples[:, 0], x[4000:10000])
    assert w.duration == 0.75


# --- one test per bad-audio kind -------------------------------------------------------------------

def test_truncated_flac_is_undecodable():
    data = aio.encode_audio(_tone(440, 16000, 2.0), 16000, "flac")
    assert _kind(aio.decode_audio, data[: len(data) // 2]) == "undecodable"


def test_truncated_wav_is_undecodable():
    data = aio.encode_audio(_tone(440, 16000, 2.0), 16000, "pcm16")
    assert _kind(aio.decode_audio, data[: len(data) // 2]) == "undecodable"


def test_garbage_bytes_are_undecodable():
    assert _kind(aio.decode_audio, b"this is not audio at all" * 20) == "undecodable"
    assert _kind(aio.decode_audio, b"") == "undecodable"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_samples(bad):
    x = _tone(440, 8000, 0.1)
    x[37] = bad
    buf = io.BytesIO()
    sf.write(buf, x, 8000, format="WAV", subtype="FLOAT")  # float WAV can carry NaN/inf
    assert _kind(aio.decode_audio, buf.getvalue()) == "nonfinite"
    assert _kind(aio.validate_audio, x, 8000) == "nonfinite"
    assert _kind(aio.encode_audio, x, 8000) == "nonfinite"


def test_zero_length_is_empty():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, np.float32), 16000, format="WAV", subtype="PCM_16")
    assert _kind(aio.decode_audio, buf.getvalue()) == "empty"
    assert _kind(aio.validate_audio, np.zeros(0, np.float32), 16000) == "empty"


def test_absurd_duration_is_too_long():
    data = aio.encode_audio(np.zeros(8000 * 3, np.float32), 8000)
    assert _kind(aio.decode_audio, data, max_seconds=2.0) == "too_long"
    assert aio.decode_audio(data, max_seconds=4.0).shape == (24000,)
    assert _kind(aio.validate_audio, np.zeros(16000 * 601, np.float32), 16000) == "too_long"  # default 600 s


def test_missing_file(tmp_path):
    assert _kind(aio.read_audio_file, tmp_path / "nope.flac") == "missing_file"
