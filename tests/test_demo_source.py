"""The demo audio source: determinism, exact metadata, event/speech timing, SNR, learnability, errors."""

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from alm_jax.audio import synth
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.sources.demo import KINDS, DemoSource, compose_caption
from alm_jax.errors import AudioError, ConfigError

needs_speech = pytest.mark.skipif(not synth.speech_available(), reason=synth.speech_backend_description())
EDGE_SECONDS = 0.05


def digest(meta: ClipMeta, wave: np.ndarray) -> str:
    return hashlib.sha256(wave.tobytes() + json.dumps(meta.to_dict(), sort_keys=True).encode()).hexdigest()


def spans(meta: ClipMeta) -> list[tuple[float, float]]:
    return [(e.onset, e.offset) for e in meta.events] + [(s.start, s.end) for s in meta.speech]


def inside_mask(meta: ClipMeta, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    for start, end in spans(meta):
        mask[round(start * meta.sample_rate): round(end * meta.sample_rate)] = True
    return mask


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


# -------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_clips_in_any_order():
    first = [digest(*clip) for clip in DemoSource(seed=3, n_clips=6)]
    other = DemoSource(seed=3, n_clips=100)  # n_clips does not matter
    assert [digest(*other[i]) for i in (5, 2, 0, 4, 1, 3)] == [first[i] for i in (5, 2, 0, 4, 1, 3)]
    assert len(set(first)) == 6  # different index -> different clip
    assert digest(*DemoSource(seed=4, n_clips=6)[0]) != first[0]


def test_negative_index_and_bounds():
    source = DemoSource(seed=1, n_clips=3, kinds=("events",))
    assert digest(*source[-1]) == digest(*source[2])
    with pytest.raises(IndexError):
        source[3]
    assert len(source) == 3 and len(list(source)) == 3


@needs_speech
def test_speech_clip_is_identical_in_a_fresh_process():
    source = DemoSource(seed=11, n_clips=4, kinds=("mixture",))
    here = digest(*source[3])
    code = ("import hashlib, json; from alm_jax.data.sources.demo import DemoSource; "
            "m, w = DemoSource(seed=11, n_clips=4, kinds=('mixture',))[3]; "
            "print(hashlib.sha256(w.tobytes() + json.dumps(m.to_dict(), sort_keys=True).encode()).hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert there.stdout.strip() == here


# -------------------------------------------------------------------------------------------------------------
# Metadata


def test_metadata_is_complete_and_round_trips_through_json():
    source = DemoSource(seed=5, n_clips=12)
    kinds_seen = set()
    for meta, wave in source:
        assert ClipMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
        assert meta.source == "demo" and meta.sample_rate == 16000
        assert wave.dtype == np.float32 and wave.shape == (round(meta.duration * 16000),)
        assert 0.3 <= np.abs(wave).max() <= 0.9 + 1e-6
        assert 2.0 <= meta.duration <= 10.0
        assert set(synth.EVENT_LABELS) <= set(meta.label_vocabulary) and set(meta.labels) <= set(meta.label_vocabulary)
        assert meta.labels == tuple(sorted({e.label for e in meta.events})) + (("speech",) if meta.speech else ())
        assert meta.attributes["background"] in synth.BACKGROUNDS
        assert (meta.attributes["snr_db"] is None) == (meta.attributes["background"] == "silence")
        assert meta.caption and meta.caption.endswith(".")
        for start, end in spans(meta):
            assert 0 <= start < end <= meta.duration
        for s in meta.speech:
            assert s.transcript in synth.SENTENCES
            assert s.attributes["gender"] == synth.VOICES[s.attributes["voice"]]
            assert 110 <= s.attributes["rate_wpm"] <= 210 and 20 <= s.attributes["pitch"] <= 80
        assert desta_seed_description(meta).count("\n") + 1 == (len(meta.events) + len(meta.speech)
                                                                 + (meta.attributes["background"] != "silence"))
        kinds_seen.add(meta.extra["kind"])
        assert {"events": bool(meta.events) and not meta.speech, "speech": bool(meta.speech) and not meta.events,
                "mixture": bool(meta.speech) and bool(meta.events)}[meta.extra["kind"]]
    expected = set(KINDS) if synth.speech_available() else {"events"}
    assert kinds_seen == expected


def test_caption_template():
    items = [(2.0, 3.0, "a bell rings"), (0.0, 2.5, "a dog barks"), (4.0, 5.0, "a man speaks")]
    assert compose_caption(items, "pink noise") == ("A dog barks while a bell rings, then a man speaks, "
                                                    "over pink noise.")
    assert compose_caption([(0.0, 1.0, "a siren wails")], "silence") == "A siren wails."


# -------------------------------------------------------------------------------------------------------------
# Timing: the labelled spans are where the sound is


def test_event_spans_hold_the_energy_over_silence():
    source = DemoSource(seed=7, n_clips=25, kinds=("events",), backgrounds=("silence",))
    for meta, wave in source:
        outside = ~inside_mask(meta, len(wave))
        assert not np.any(wave[outside]), meta.clip_id
        peak, edge = np.abs(wave).max(), round(EDGE_SECONDS * meta.sample_rate)
        for e in meta.events:
            a, b = round(e.onset * meta.sample_rate), round(e.offset * meta.sample_rate)
            # tight spans: sound right after the onset and right before the offset (> -60 dB of the peak)
            assert rms(wave[a: a + edge]) > 1e-3 * peak and rms(wave[b - edge: b]) > 1e-3 * peak, e


@needs_speech
def test_speech_spans_hold_the_speech_over_silence():
    source = DemoSource(seed=8, n_clips=6, kinds=("speech",), backgrounds=("silence",))
    for meta, wave in source:
        assert meta.speech and not meta.events
        outside = ~inside_mask(meta, len(wave))
        assert not np.any(wave[outside])
        peak, edge = np.abs(wave).max(), round(EDGE_SECONDS * meta.sample_rate)
        for s in meta.speech:
            a, b = round(s.start * meta.sample_rate), round(s.end * meta.sample_rate)
            assert rms(wave[a:b]) > 0.05 * peak
            assert rms(wave[a: a + edge]) > 1e-3 * peak and rms(wave[b - edge: b]) > 1e-3 * peak
            # espeak speaks at roughly the requested rate: 60 / wpm seconds per word, give or take 2x
            seconds_per_word = (s.end - s.start) / len(s.transcript.split())
            assert 0.5 < seconds_per_word * s.attributes["rate_wpm"] / 60 < 2.0


def test_background_is_mixed_at_the_recorded_snr():
    source = DemoSource(seed=9, n_clips=12, kinds=("events",), backgrounds=("white noise",), max_events=1)
    checked = 0
    for meta, wave in source:
        inside = inside_mask(meta, len(wave))
        if inside.mean() > 0.8:
            continue
        noise_power = np.mean(wave[~inside].astype(np.float64) ** 2)
        signal_power = np.mean(wave[inside].astype(np.float64) ** 2) - noise_power
        assert 10 * np.log10(signal_power / noise_power) == pytest.approx(meta.attributes["snr_db"], abs=0.5)
        checked += 1
    assert checked >= 5


def test_mix_at_snr_is_exact():
    rng = np.random.default_rng(0)
    foreground = np.zeros(16000, np.float32)
    foreground[4000:8000] = synth.synthesize_event("siren", 0.25, rng=rng)
    active = foreground != 0
    background = synth.synthesize_background("brown noise", 1.0, rng=rng)
    mixed = synth.mix_at_snr(foreground, background, 7.0, active)
    noise = mixed.astype(np.float64) - foreground
    snr = 10 * np.log10(np.mean(foreground[active].astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert snr == pytest.approx(7.0, abs=1e-3)


# -------------------------------------------------------------------------------------------------------------
# The classes can be told apart: nearest centroid on mean log-mel over the labelled event span


def test_event_classes_are_learnable_by_nearest_centroid():
    torch = pytest.importorskip("torch")
    from transformers import WhisperFeatureExtractor

    torch.set_num_threads(1)  # the extractor's STFT is far slower with oversubscribed threads on 2 cores
    extractor = WhisperFeatureExtractor(feature_size=80)
    n_train, n_test = 10, 5
    waves, metas, labels = [], [], []
    for class_index, label in enumerate(synth.EVENT_LABELS):
        source = DemoSource(seed=100 + class_index, n_clips=n_train + n_test, kinds=("events",), max_events=1,
                            event_labels=(label,), min_duration=1.0, max_duration=1.0, backgrounds=("silence",))
        for meta, wave in source:
            waves.append(wave), metas.append(meta), labels.append(class_index)
    log_mel = extractor(np.stack(waves), sampling_rate=16000, return_tensors="np",
                        padding="longest")["input_features"]  # [n, 80, 100]: 1 s clips, no padding
    frames_per_second = 100
    features = np.stack([
        mel[:, int(m.events[0].onset * frames_per_second): int(np.ceil(m.events[0].offset * frames_per_second))]
        .mean(axis=1) for mel, m in zip(log_mel, metas)])
    labels = np.array(labels)
    is_train = np.arange(len(labels)) % (n_train + n_test) < n_train
    centroids = np.stack([features[is_train & (labels == c)].mean(axis=0) for c in range(len(synth.EVENT_LABELS))])
    distances = ((features[~is_train, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float((distances.argmin(axis=1) == labels[~is_train]).mean())
    assert accuracy >= 0.9, accuracy


# -------------------------------------------------------------------------------------------------------------
# Synth building blocks and errors


def test_every_event_class_is_deterministic_and_sized():
    assert len(synth.EVENT_LABELS) >= 12
    for label in synth.EVENT_LABELS:
        for duration in (0.05, 0.7):
            a = synth.synthesize_event(label, duration, rng=np.random.default_rng(1))
            b = synth.synthesize_event(label, duration, rng=np.random.default_rng(1))
            assert a.dtype == np.float32 and a.shape == (round(duration * 16000),) and np.isfinite(a).all()
            assert np.array_equal(a, b)
            assert synth.loudness_rms(a, 16000) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("call", [
    lambda: synth.synthesize_event("kazoo", 1.0),
    lambda: synth.synthesize_event("siren", 0.0),
    lambda: synth.synthesize_event("siren", float("nan")),
    lambda: synth.synthesize_event("siren", 1.0, sample_rate=8000),
    lambda: synth.synthesize_background("rain", 1.0),
    lambda: synth.mix_at_snr(np.zeros(10, np.float32), np.ones(10, np.float32), 10.0),
    lambda: synth.mix_at_snr(np.ones(10, np.float32), np.ones(11, np.float32), 10.0),
    lambda: synth.synthesize_speech("Hello.", voice="klingon"),
    lambda: synth.synthesize_speech("Hello.", rate_wpm=20),
    lambda: synth.synthesize_speech("   "),
])
def test_bad_synth_parameters_raise_audio_error(call):
    with pytest.raises(AudioError):
        call()


@pytest.mark.parametrize("kwargs", [
    {"seed": -1}, {"kinds": ("events", "music")}, {"kinds": ()}, {"event_labels": ("kazoo",)},
    {"min_duration": 5.0, "max_duration": 2.0}, {"snr_db_range": (10.0, 0.0)}, {"max_events": 0},
])
def test_bad_source_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        DemoSource(**kwargs)


def test_without_espeak_speech_kinds_are_dropped_with_a_clear_message(monkeypatch):
    reason = "speech synthesis is unavailable: no espeak-ng (test)."
    monkeypatch.setattr(synth, "_speech_backend", lambda: (None, reason))
    assert not synth.speech_available()
    with pytest.raises(synth.SpeechUnavailableError, match="no espeak-ng"):
        synth.synthesize_speech("Hello there.")
    with pytest.warns(UserWarning, match="no espeak-ng"):
        source = DemoSource(seed=0, n_clips=4)
    assert source.kinds == ("events",) and "speech" not in source.label_vocabulary
    assert all(meta.extra["kind"] == "events" for meta, _ in source)
    with pytest.raises(synth.SpeechUnavailableError), warnings.catch_warnings():
        DemoSource(kinds=("speech", "mixture"))
