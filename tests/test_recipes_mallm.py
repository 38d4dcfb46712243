"""MALLM: the demo pair generator (clips differ exactly in the intended event or word, checked on the
rendered metadata and waveforms) and the recipe's open / closed-form items."""

import collections
import hashlib
import re

import numpy as np
import pytest

from alm_jax.audio import synth
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import alarm_seed_description, desta_seed_description
from alm_jax.data.sources.demo import CONTENT_EDITS, LEVEL_EDITS, DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes.mallm import MallmRecipe, transcript_words

needs_speech = pytest.mark.skipif(not synth.speech_available(), reason=synth.speech_backend_description())
N_PAIRS = 80


def event_set(meta):
    return collections.Counter((e.label, e.onset, e.offset) for e in meta.events)


@pytest.fixture(scope="module")
def source():
    return DemoSource(seed=13, n_clips=N_PAIRS, min_duration=1.5, max_duration=4.0)


@pytest.fixture(scope="module")
def pairs(source):
    return [source.pair(i) for i in range(N_PAIRS)]


def test_pairs_differ_exactly_in_the_intended_event_or_word(pairs):
    edits = collections.Counter()
    for pair in pairs:
        (a, wa), (b, wb) = pair.first, pair.second
        edits[pair.edit] += 1
        assert (a.duration, a.sample_rate, a.attributes["background"]) == (b.duration, b.sample_rate,
                                                                          b.attributes["background"])
        assert wa.shape == wb.shape == (round(a.duration * a.sample_rate),)
        ea, eb = event_set(a), event_set(b)
        if pair.edit == "add":
            assert not ea - eb and len(eb - ea) == 1 and a.speech == b.speech == ()
            (added, onset, offset), = (eb - ea)
            assert added == pair.after and added not in a.labels and pair.before is None
            assert (onset, offset) == pair.span and set(b.labels) == set(a.labels) | {added}
        elif pair.edit == "remove":
            assert not eb - ea and len(ea - eb) == 1 and a.speech == b.speech == ()
            (removed, onset, offset), = (ea - eb)
            assert removed == pair.before and removed not in b.labels and pair.after is None
            assert (onset, offset) == pair.span and set(a.labels) == set(b.labels) | {removed}
        elif pair.edit == "replace":
            (old, *old_span), = (ea - eb)
            (new, *new_span), = (eb - ea)
            assert old_span == new_span == list(pair.span) and (old, new) == (pair.before, pair.after)
            assert old not in b.labels and new not in a.labels and len(a.events) == len(b.events)
        else:
            assert pair.edit == "word" and not a.events and not b.events
            (sa,), (sb,) = a.speech, b.speech
            assert (sa.start, sa.attributes) == (sb.start, sb.attributes) and sa.transcript in synth.SENTENCES
            wa_words, wb_words = transcript_words(a), transcript_words(b)
            assert len(wa_words) == len(wb_words)
            changed = [(x, y) for x, y in zip(wa_words, wb_words) if x != y]
            assert changed == [(pair.before, pair.after)]
            assert pair.span == (sa.start, max(sa.end, sb.end))
        # the waveforms are sample-identical outside the edited span and differ inside it
        lo, hi = round(pair.span[0] * a.sample_rate), round(pair.span[1] * a.sample_rate)
        outside = np.ones(len(wa), bool)
        outside[lo:hi] = False
        assert np.array_equal(wa[outside], wb[outside]), pair.edit
        assert not np.array_equal(wa[lo:hi], wb[lo:hi])
        assert 0.3 <= max(np.abs(wa).max(), np.abs(wb).max()) <= 0.9 + 1e-6     # one peak scale for both
        if a.attributes["background"] == "silence":
            assert a.attributes["snr_db"] is None and b.attributes["snr_db"] is None
    expected = set(CONTENT_EDITS) if synth.speech_available() else set(CONTENT_EDITS) - {"word"}
    assert set(edits) == expected, edits   # level / length are opt-in: a default source's pairs are unchanged


def test_pairs_are_deterministic_and_apart_from_the_clip_stream(source, pairs):
    def digest(clip):
        meta, wave = clip
        return hashlib.sha256(wave.tobytes() + repr(meta.to_dict()).encode()).hexdigest()
    again = DemoSource(seed=13, n_clips=3, min_duration=1.5, max_duration=4.0).pair(7)
    assert (digest(again.first), digest(again.second)) == (digest(pairs[7].first), digest(pairs[7].second))
    assert pairs[7].first[0].clip_id == "demo-13-pair0000007-a" and pairs[7].second[0].extra["pair_member"] == 1
    assert digest(source.pair(8).first) != digest(pairs[7].first)


def test_sentence_swaps_are_unambiguous_one_word_edits():
    assert set(synth.SENTENCE_SWAPS) == set(synth.SENTENCES)
    for sentence, swaps in synth.SENTENCE_SWAPS.items():
        words = re.findall(r"[A-Za-z']+", sentence)
        lowered = [w.lower() for w in words]
        for word, replacements in swaps.items():
            assert words.count(word) == 1, (sentence, word)
            for r in replacements:
                assert r.lower() not in lowered and " " not in r, (sentence, r)


@pytest.fixture(scope="module")
def level_pairs():
    source = DemoSource(seed=5, n_clips=24, min_duration=1.5, max_duration=4.0, pair_edits=LEVEL_EDITS)
    return [source.pair(i) for i in range(24)]


def rms(wave):
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


def test_level_and_length_pairs_differ_only_in_loudness_or_duration(level_pairs):
    edits = collections.Counter(p.edit for p in level_pairs)
    assert set(edits) == set(LEVEL_EDITS), edits
    for pair in level_pairs:
        (a, wa), (b, wb) = pair.first, pair.second
        assert (a.labels, a.events, a.speech) == (b.labels, b.events, b.speech) and pair.before is pair.after is None
        assert wa.shape == (round(a.duration * a.sample_rate),) and wb.shape == (round(b.duration * b.sample_rate),)
        assert a.attributes["background"] == b.attributes["background"]
        if pair.edit == "level":   # the same samples, the second 6-12 dB quieter, which the descriptions say
            drop = b.attributes["level_db"]
            assert a.duration == b.duration and a.attributes["level_db"] == 0.0 and -12 <= drop <= -6
            assert np.allclose(wb, wa * 10 ** (drop / 20), atol=1e-6)
            assert 20 * np.log10(rms(wb) / rms(wa)) == pytest.approx(drop, abs=0.01)
            assert "(Volume: High)" in desta_seed_description(a)
            assert f"(Volume: Low, {-drop:g} dB quieter)" in desta_seed_description(b)
            assert f"|volume: Low, {-drop:g} dB quieter|" in alarm_seed_description(b)
        else:                      # the shorter clip is the longer one's first samples, over audible noise
            gap = b.duration - a.duration
            assert 1.0 <= gap <= 3.0 + 1e-9 and pair.span == (a.duration, b.duration)
            assert b.duration <= 4.0 and a.attributes["background"] != "silence"
            assert np.array_equal(wa, wb[: len(wa)]) and rms(wb[len(wa):]) > 1e-3
            assert all(e.offset <= a.duration for e in a.events) and "volume" not in a.attributes
            assert desta_seed_description(a) != desta_seed_description(b)   # the background line's span


def test_closed_form_louder_and_longer_name_the_louder_and_longer_waveform(level_pairs):
    recipe = MallmRecipe(seed=4, closed=1.0)
    tasks = collections.Counter()
    for i in range(len(level_pairs)):
        item = recipe.item_for(i, PairList(level_pairs))
        md = item.metadata
        tasks[md["task"]] += 1
        (_, w1), (_, w2) = item.clips
        louder, longer = (1 if rms(w1) > rms(w2) else 2), (1 if len(w1) > len(w2) else 2)
        expected = louder if md["edit"] == "level" else longer
        assert md["answer_clip"] == expected, (md, rms(w1), rms(w2))
        word = "louder" if md["edit"] == "level" else "longer"
        assert md["answer"] in (f"Audio {expected} is {word}.", f"The {('first', 'second')[expected - 1]} clip is {word}.")
        assert md["task"].endswith(word) and (md["task"].startswith("which_audio_") == ("Audio" in md["answer"]))
    assert set(tasks) == {"which_louder", "which_audio_louder", "which_longer", "which_audio_longer"}, tasks


def test_pair_settings_errors():
    with pytest.raises(ConfigError, match="distinct event labels"):
        DemoSource(seed=0, n_clips=1, event_labels=("bell",), pair_edits=("add",)).pair(0)
    with pytest.raises(ConfigError, match="no pair edits"):
        DemoSource(seed=0, n_clips=1, kinds=("events",), pair_edits=("word",)).pair(0)
    with pytest.raises(ConfigError, match="pair_edits"):
        DemoSource(pair_edits=("swap",))
    with pytest.raises(ConfigError, match="noise background"):
        DemoSource(seed=0, n_clips=1, backgrounds=("silence",), pair_edits=("length",)).pair(0)
    with pytest.raises(ConfigError, match="max_duration >= 1.5"):
        DemoSource(seed=0, n_clips=1, min_duration=0.5, max_duration=1.2, pair_edits=("length",)).pair(0)


class PairList:
    """Serves precomputed pairs (rendered once for the module)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def pair(self, i):
        return self.pairs[i]


def test_closed_form_answers_come_from_metadata(pairs):
    recipe = MallmRecipe(seed=3, closed=1.0)
    tasks, swapped = collections.Counter(), collections.Counter()
    for i in range(N_PAIRS):
        item = recipe.item_for(i, PairList(pairs))
        md = item.metadata
        tasks[md["task"]] += 1
        swapped[md["swapped"]] += 1
        a, b = (meta for meta, _ in item.clips)
        assert item.fixed_response == md["answer"] and md["answer"]
        ordinal = "first" if md["answer_clip"] == 1 else "second"
        inside, outside = (a, b) if md["answer_clip"] == 1 else (b, a)
        if md["task"] == "which_has_sound":
            label = re.search(r"clip contains (.+)\.$", md["answer"]).group(1)
            assert label in inside.labels and label not in outside.labels and label in md["instruction"]
            assert md["answer"].startswith(f"The {ordinal} clip")
        elif md["task"] == "which_says":
            word = re.search(r'says "(.+)" in', md["answer"]).group(1)
            assert word in transcript_words(inside) and word not in transcript_words(outside)
            assert md["answer"].endswith(f"the {ordinal} clip.")
        elif md["task"] == "which_audio_has_sound":   # the clips named as the training layout labels them
            number, label = re.search(r"^Audio ([12]) contains (.+)\.$", md["answer"]).groups()
            assert int(number) == md["answer_clip"] and "Audio 1 or" in md["instruction"]
            assert label in inside.labels and label not in outside.labels and label in md["instruction"]
        elif md["task"] == "which_audio_says":
            word, number = re.search(r'says "(.+)" in Audio ([12])\.$', md["answer"]).groups()
            assert int(number) == md["answer_clip"] and word in md["instruction"]
            assert word in transcript_words(inside) and word not in transcript_words(outside)
        elif md["task"] == "what_differs_replace":
            first, second = re.search(r"first clip has (.+) where the second clip has (.+)\.", md["answer"]).groups()
            assert first in a.labels and first not in b.labels and second in b.labels and second not in a.labels
        elif md["task"] == "what_differs_word":
            first, second = re.search(r'says "(.+)" in the first clip and "(.+)" in the second', md["answer"]).groups()
            assert first in transcript_words(a) and second in transcript_words(b) and first != second
        else:
            assert md["task"] == "what_differs_add"
            label = re.search(r"clip has (.+), which the", md["answer"]).group(1)
            which = a if "The first" in md["answer"] else b
            other = b if which is a else a
            assert label in which.labels and label not in other.labels
        record = Record.from_bytes(item.to_record(item.fixed_response, "some-llm").to_bytes())
        assert record.provenance.generator == "metadata" and len(record.clips) == 2
        assert record.messages[1]["content"].count("<audio>") == 2
    assert len(tasks) >= 5 and set(swapped) == {True, False}, (tasks, swapped)


def test_open_difference_items(pairs):
    recipe = MallmRecipe(seed=3, closed=0.0)
    item = recipe.item_for(5, PairList(pairs))
    user = item.generation_messages[1]["content"]
    assert item.fixed_response is None and item.metadata["task"] == "difference"
    assert user.startswith(f"[Begin of audio 1]\n{item.seed_descriptions[0]}\n[End of audio 1]\n"
                           f"[Begin of audio 2]\n{item.seed_descriptions[1]}\n[End of audio 2]\n"
                           f"{item.metadata['instruction']}\n\nThe two clips are identical except for one change.")
    assert item.record_messages[1]["content"] == ("Audio 1: <start_audio><audio><end_audio>\n"
                                                  "Audio 2: <start_audio><audio><end_audio>\n"
                                                  + item.metadata["instruction"])
    assert item.to_record("The second clip has an extra bell.", "fake").provenance.generator == "fake"
    half = collections.Counter(MallmRecipe(seed=1).item_for(i, PairList(pairs)).metadata["task"] == "difference"
                               for i in range(N_PAIRS))
    assert 20 < half[True] < 60


def test_recipe_errors():
    with pytest.raises(ConfigError, match="pair"):
        MallmRecipe().item_for(0, [("meta", "wave")])
    with pytest.raises(ConfigError, match="closed"):
        MallmRecipe(closed=2)
