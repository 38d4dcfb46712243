"""BALSa: negatives never name a present or co-occurring sound (property test over 500 demo clips),
prompt construction, ratios, seed formats, co-occurrence from metadata, and yes/no post-processing."""

import collections
import dataclasses
import time

import numpy as np
import pytest

from alm_jax.audio import synth
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.records import Record
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes.balsa import BalsaRecipe, tags_seed_description, yes_no_answer
from alm_jax.recipes.base import END_AUDIO
from alm_jax.recipes.cooccurrence import Cooccurrence, clip_context

# Written out independently of the synth: a background that sounds like an event class.
SOUNDS_LIKE = {"white noise": {"white noise"}, "pink noise": {"pink noise"}, "hum": {"engine hum"}}


@dataclasses.dataclass
class Out:
    text: str
    n_tokens: int = 10
    finished: bool = True


class ListSource:
    """A minimal source without mixing rules: `source[i] -> (meta, waveform)`."""

    def __init__(self, metas):
        self.metas = list(metas)

    def __len__(self):
        return len(self.metas)

    def __getitem__(self, i):
        return self.metas[i], np.zeros(1600, np.float32)


def after_audio(item) -> str:
    """The part of the generation prompt after the audio: instruction + hints."""
    return item.generation_messages[1]["content"].split(END_AUDIO, 1)[1]


class CachedDemo:
    """A DemoSource whose clips are rendered once (the tests read each clip several times)."""

    def __init__(self, source: DemoSource):
        self.source, self.label_vocabulary = source, source.label_vocabulary
        self.cooccurrence_pairs = source.cooccurrence_pairs
        self.clips = {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i not in self.clips:
            self.clips[i] = self.source[i]
        return self.clips[i]


@pytest.fixture(scope="module")
def demo():
    return CachedDemo(DemoSource(seed=21, n_clips=500, min_duration=1.0, max_duration=2.5))


def test_negatives_never_name_a_present_or_cooccurring_sound(demo):
    t0 = time.perf_counter()
    recipe = BalsaRecipe(seed=2, yes_no=0.5, seed_format="mixed")
    seen = collections.Counter()
    for i in range(len(demo)):
        meta = demo[i][0]
        item = recipe.item_for(i, source=demo)
        md = item.metadata
        background = meta.attributes["background"]
        forbidden = set(meta.labels) | SOUNDS_LIKE.get(background, set())
        named_absent = set(md["absent"]) | set(md["hint_absent"])
        assert not named_absent & forbidden, (meta.clip_id, named_absent, forbidden)
        assert named_absent <= set(meta.label_vocabulary)
        assert set(md["present"]) <= set(meta.labels)
        # the prompt text (instruction + hints) never names a forbidden sound the item does not name as present
        for label in forbidden - set(md["present"]):
            assert label not in after_audio(item), (meta.clip_id, label, after_audio(item))
            assert label not in item.record_messages[1]["content"]
        if md["expected"] == "yes":
            assert md["present"] and not md["absent"]
        elif md["expected"] == "no":
            assert md["absent"]
        if SOUNDS_LIKE.get(background, set()) - set(meta.labels):
            seen["confusable_background"] += 1     # the rule mattered: a naive negative could name it
        seen[md["prompt_type"]] += 1
        seen[md["form"]] += 1
    assert seen["confusable_background"] > 50
    assert min(seen["positive"], seen["negative"], seen["combined"]) > 100
    assert min(seen["yes_no"], seen["open"]) > 180
    print(f"500 BALSa items in {time.perf_counter() - t0:.1f} s: {dict(seen)}")


def test_demo_rules_and_the_exclusion_set(demo):
    table = Cooccurrence.from_source(demo.source)
    assert set(table.pairs()) == {("background:white noise", "white noise"), ("background:pink noise", "pink noise"),
                                  ("background:hum", "engine hum")}
    meta = ClipMeta("x", "demo", 2.0, 16000, labels=("bell",), attributes={"background": "hum"},
                    label_vocabulary=("bell", "engine hum", "siren", "speech"))
    assert clip_context(meta) == {"bell", "background:hum"}
    assert table.excluded(meta) == {"bell", "background:hum", "engine hum"}
    assert table.absent_labels(meta) == ("siren", "speech")
    silent = dataclasses.replace(meta, attributes={"background": "silence"})
    assert table.absent_labels(silent) == ("engine hum", "siren", "speech")


def test_cooccurrence_from_metadata_for_sources_without_rules():
    vocab = ("speech", "music", "dog", "car", "siren")
    metas = [ClipMeta(f"c{k}", "fake", 1.0, 16000, labels=labels, label_vocabulary=vocab)
             for k, labels in enumerate([("speech", "music"), ("dog", "speech"), ("car",), ("speech", "music")])]
    table = Cooccurrence.from_clips(metas)
    assert table.related({"speech"}) == {"music", "dog"}
    assert Cooccurrence.from_clips(metas, min_count=2).related({"speech"}) == {"music"}
    assert (Cooccurrence([("a", "b")]) | Cooccurrence([("b", "c")])).related({"b"}) == {"a", "c"}
    # "auto" on a source without rules counts pairs in its metadata
    source = ListSource(metas)
    recipe = BalsaRecipe(seed=0, positive=0, combined=0, yes_no=1.0)
    assert recipe.cooccurrence(source).pairs() == table.pairs()
    for i in (0, 1, 3):
        assert recipe.item_for(i, source).metadata["absent"][0] in ("car", "siren")
    item = recipe.item_for(2, source)                                   # 'car' co-occurs with nothing
    assert item.metadata["absent"][0] in ("speech", "music", "dog", "siren")
    with pytest.raises(ConfigError, match="no co-occurrence rules"):
        BalsaRecipe(cooccurrence="source").item_for(0, source)
    with pytest.raises(ConfigError, match="min_count"):
        Cooccurrence.from_clips(metas, min_count=0)


def test_prompt_construction_and_record(demo):
    recipe = BalsaRecipe(seed=9)
    for i in range(40):
        item = recipe.item_for(i, demo)
        md = item.metadata
        user = item.generation_messages[1]["content"]
        assert item.generation_messages[0]["content"] == "You are a helpful assistant."
        assert user.startswith("[Begin of audio]\n" + item.seed_descriptions[0] + "\n[End of audio]\n"
                               + md["instruction"] + "\n\n")
        assert item.record_messages[1]["content"] == "<start_audio><audio><end_audio>\n" + md["instruction"]
        assert ("Begin your answer with \"Yes\" or \"No\"" in user) == (md["expected"] is not None)
        assert ("is not in the clip" in user) == (md["prompt_type"] != "positive")
        for label in md["hint_absent"]:
            assert label in user.split("include:")[1]
        record = Record.from_bytes(item.to_record("Yes, it is there.", "fake").to_bytes())
        assert record.recipe == "balsa" and record.metadata["prompt_type"] == md["prompt_type"]
    again = BalsaRecipe(seed=9).item_for(17, demo)
    assert again.generation_messages == recipe.item_for(17, demo).generation_messages


def test_ratios_forms_and_shared_yes_no_wording(demo):
    only_negative = BalsaRecipe(seed=1, positive=0, negative=1, combined=0, yes_no=1.0)
    items = [only_negative.item_for(i, demo) for i in range(60)]
    assert all(it.metadata["prompt_type"] == "negative" and it.metadata["expected"] == "no" for it in items)
    open_only = BalsaRecipe(seed=1, yes_no=0.0)
    assert all(open_only.item_for(i, demo).metadata["form"] == "open" for i in range(60))
    weighted = BalsaRecipe(seed=3, positive=1, negative=2, combined=1)
    counts = collections.Counter(weighted.item_for(i, demo).metadata["prompt_type"] for i in range(400))
    assert 150 < counts["negative"] < 250 and counts["positive"] < counts["negative"]
    # yes/no questions about present and absent sounds come from the same templates
    used = collections.defaultdict(set)
    for i in range(200):
        md = BalsaRecipe(seed=4, combined=0, yes_no=1.0).item_for(i, demo).metadata
        used[md["expected"]].add(md["template_index"])
    assert len(used["yes"] & used["no"]) >= 4
    for bad, match in (({"positive": -1}, "positive"), ({"positive": 0, "negative": 0, "combined": 0}, "at least"),
                       ({"yes_no": 1.5}, "yes_no"), ({"seed_format": "xml"}, "seed_format"),
                       ({"cooccurrence": "rules"}, "cooccurrence"), ({"max_absent": 0}, "max_absent")):
        with pytest.raises(ConfigError, match=match):
            BalsaRecipe(**bad)


def test_fallback_when_nothing_is_absent():
    vocab = ("bell", "siren")
    meta = ClipMeta("full", "fake", 2.0, 16000, labels=vocab, label_vocabulary=vocab, caption="A bell and a siren.")
    recipe = BalsaRecipe(seed=0, positive=0, negative=1, combined=1, yes_no=1.0)
    md = recipe.item_for(0, ListSource([meta])).metadata
    assert (md["prompt_type"], md["fallback"], md["expected"]) == ("positive", "no_absent_label", "yes")


def test_seed_formats(demo):
    meta = demo[3][0]
    recipe = BalsaRecipe(seed=0, seed_format="tags")
    assert recipe.item_for(3, demo).seed_descriptions == [tags_seed_description(meta)]
    assert tags_seed_description(meta).startswith("Sound labels: ")
    assert BalsaRecipe(seed=0, seed_format="caption").item_for(3, demo).seed_descriptions == [meta.caption]
    mixed = collections.Counter(BalsaRecipe(seed=0, seed_format="mixed").item_for(i, demo).metadata["seed_format"]
                                for i in range(60))
    assert set(mixed) == {"desta", "caption", "tags"}


def test_finalize_checks_the_yes_no_answer_against_metadata(demo):
    recipe = BalsaRecipe(seed=5, combined=0, yes_no=1.0)
    by_expected = {}
    for i in range(40):
        item = recipe.item_for(i, demo)
        by_expected.setdefault(item.metadata["expected"], item)
    yes_item, no_item = by_expected["yes"], by_expected["no"]
    assert recipe.finalize(yes_item, [Out("Yes, I can hear it clearly.")]).text == "Yes, I can hear it clearly."
    assert recipe.finalize(no_item, [Out("**No**. There is only a beep.")]).kept
    assert recipe.finalize(no_item, [Out("Yes, it is there.")]).reason == "wrong_answer"
    assert recipe.finalize(yes_item, [Out("There is a sound like that.")]).reason == "no_yes_no"
    assert recipe.finalize(yes_item, [Out("Yes.\n[00:00-00:02] (Audio category: bell")]).reason == \
        "rejected_by_recipe"
    open_item = BalsaRecipe(seed=5, yes_no=0.0).item_for(0, demo)
    assert recipe.finalize(open_item, [Out("I hear a bell ringing twice.")]).kept
    assert [yes_no_answer(t) for t in ("Yes!", " no, never", "Yesterday I heard", "Nope")] == ["yes", "no", None, None]


def test_demo_vocabulary_matches_the_synth(demo):
    assert set(demo.label_vocabulary) == set(synth.EVENT_LABELS) | ({"speech"} if synth.speech_available() else set())


def test_answer_hint_states_the_answer_and_starts_the_response(demo):
    plain, hinted = BalsaRecipe(seed=5, combined=0, yes_no=1.0), BalsaRecipe(seed=5, combined=0, yes_no=1.0,
                                                                           answer_hint=True)
    seen = set()
    for i in range(30):
        a, b = plain.item_for(i, demo), hinted.item_for(i, demo)
        expected = b.metadata["expected"]
        seen.add(expected)
        assert a.response_prefix is None and b.response_prefix == f"{expected.capitalize()},"
        assert f'The correct answer is "{expected.capitalize()}"' in after_audio(b)
        assert "correct answer" not in after_audio(a)
        assert a.record_messages == b.record_messages   # the training prompt never carries the hint
    assert seen == {"yes", "no"}
    open_item = BalsaRecipe(seed=5, yes_no=0.0, answer_hint=True).item_for(0, demo)
    assert open_item.response_prefix is None
    with pytest.raises(ConfigError, match="answer_hint"):
        BalsaRecipe(answer_hint="yes")


def test_a_copied_hint_is_cut_from_the_target(demo):
    recipe = BalsaRecipe(seed=5, combined=0, yes_no=1.0, answer_hint=True)
    no_item = next(it for it in (recipe.item_for(i, demo) for i in range(40)) if it.metadata["expected"] == "no")
    out = recipe.finalize(no_item, [Out('No, the clip has no siren. The correct answer is "No": begin your answer')])
    assert out.text == "No, the clip has no siren."
    open_item = BalsaRecipe(seed=5, negative=1, positive=0, combined=0, yes_no=0.0).item_for(0, demo)
    out = BalsaRecipe(seed=5).finalize(open_item, [Out("Sounds that are not in the clip include: bell. Sounds that "
                                                       "are not in the clip include: bell.")])
    assert out.text == "Sounds that are not in the clip include: bell."   # a first-sentence copy keeps one sentence
    assert BalsaRecipe(seed=5).finalize(open_item, [Out("I hear only a dog bark.")]).text == "I hear only a dog bark."
    # only the hints BALSa shows are cut: DeSTA's label hint, kept in the same file, is never in a BALSa prompt
    said = "I hear a bell. Sound classes in this recording vary."
    assert BalsaRecipe(seed=5).finalize(open_item, [Out(said)]).text == said
