"""Seed descriptions (DeSTA and ALARM formats) from ClipMeta: exact expected strings."""

import pytest

from alm_jax.data.metadata import ClipMeta, Event, Speech
from alm_jax.data.seed_descriptions import (alarm_seed_description, desta_seed_description, format_duration,
                                            format_span, format_timestamp)


def clip(**fields) -> ClipMeta:
    return ClipMeta(**{"clip_id": "c", "source": "test", "duration": 10.0, "sample_rate": 16000, **fields})


def test_iemocap_style_speech_matches_the_desta_paper_example():
    meta = clip(duration=2.0, speech=(Speech("Excuse me?", 0.0, 1.9, {
        "gender": "female", "emotion": "neutral", "pitch_level": "very high", "volume": "low",
        "speaking_speed": "very slow", "voice": "ignored", "rate_wpm": 100}),))
    assert desta_seed_description(meta) == ("[00:00-00:02] Excuse me? (Emotion: Neutral, Gender: Female, "
                                            "Pitch: Very high, Volume: Low, Speaking speed: Very slow, Duration: 2s)")


def test_speech_matches_the_alarm_paper_example():
    meta = clip(duration=3.0, speech=(Speech("I think I have a doctor's appointment.", 0.0, 2.7, {
        "language": "English", "age": 29, "gender": "female", "emotion": "Disgust"}),))
    assert alarm_seed_description(meta) == ("[00:00-00:03] I think I have a doctor's appointment. "
                                            "(duration: 3s, emotion: Disgust, gender: Female, age: 29, "
                                            "language: English)")


def demo_like_mixture() -> ClipMeta:
    return clip(
        duration=7.25,
        events=(Event("dog bark", 0.4, 2.1), Event("bell", 3.05, 6.5), Event("siren", 0.4, 0.7)),
        speech=(Speech("The kettle is boiling in the kitchen.", 1.2, 3.4,
                       {"gender": "male", "pitch_level": "low", "speaking_speed": "fast", "rate_wpm": 200}),),
        labels=("bell", "dog bark", "siren", "speech"),
        attributes={"background": "pink noise", "snr_db": 12.5},
        caption="A dog barks while a man speaks quickly, then a bell rings, over pink noise.")


def test_desta_mixture_lines_are_ordered_by_start_time():
    assert desta_seed_description(demo_like_mixture()) == "\n".join([
        "[00:00-00:08] (Background: pink noise, SNR: 12.5 dB)",
        "[00:00-00:01] (Audio category: siren, Duration: 0.3s)",
        "[00:00-00:03] (Audio category: dog bark, Duration: 2s)",
        "[00:01-00:04] The kettle is boiling in the kitchen. (Gender: Male, Pitch: Low, Speaking speed: Fast, "
        "Duration: 2s)",
        "[00:03-00:07] (Audio category: bell, Duration: 3s)",
    ])


def test_alarm_mixture_puts_non_speech_content_in_pipes():
    assert alarm_seed_description(demo_like_mixture()) == "\n".join([
        "[00:00-00:08] |background: pink noise (SNR 12.5 dB)|",
        "[00:00-00:01] |siren|",
        "[00:00-00:03] |dog bark|",
        "[00:01-00:04] The kettle is boiling in the kitchen. (duration: 2s, gender: Male, pitch: Low, "
        "speaking speed: Fast)",
        "[00:03-00:07] |bell|",
    ])


def test_clip_level_labels_without_times():
    meta = clip(labels=("dog", "siren"), caption="A dog barks at a passing siren.")
    assert desta_seed_description(meta) == "[00:00-00:10] (Audio category: dog, siren)"
    assert alarm_seed_description(meta) == "|dog, siren|"


def test_caption_only_clip():
    meta = clip(caption="Plastic crinkling as people talk.", attributes={"background": "silence"})
    assert desta_seed_description(meta) == "[00:00-00:10] (Plastic crinkling as people talk.)"
    assert alarm_seed_description(meta) == "|Plastic crinkling as people talk.|"


def test_speech_clip_caption_is_not_repeated_and_snr_may_be_unknown():
    meta = clip(duration=4.0, caption="A woman speaks.", labels=("speech",),
                attributes={"background": "hum", "snr_db": None},
                speech=(Speech("Hello.", 0.5, 1.25, {"gender": "female"}),))
    assert desta_seed_description(meta) == ("[00:00-00:04] (Background: hum)\n"
                                            "[00:00-00:02] Hello. (Gender: Female, Duration: 1s)")
    assert alarm_seed_description(meta) == ("[00:00-00:04] |background: hum|\n"
                                            "[00:00-00:02] Hello. (duration: 1s, gender: Female)")


def test_empty_clip_gives_empty_description():
    assert desta_seed_description(clip()) == ""
    assert alarm_seed_description(clip()) == ""


@pytest.mark.parametrize("seconds, round_up, expected", [
    (0.0, False, "00:00"), (0.999, False, "00:00"), (0.001, True, "00:01"), (2.0, True, "00:02"),
    (61.2, True, "01:02"), (75.5, False, "01:15"), (3725.0, False, "62:05"),
])
def test_format_timestamp(seconds, round_up, expected):
    assert format_timestamp(seconds, round_up=round_up) == expected


def test_format_span_and_duration():
    assert format_span(1.5, 3.2) == "[00:01-00:04]"
    assert [format_duration(d) for d in (0.04, 0.44, 0.5, 2.49, 2.5, 10.0)] == ["0.0s", "0.4s", "1s", "2s",
                                                                                "3s", "10s"]
