"""The DeSTA recipe's instruction pool, balanced draws, transcript metadata and the prompt-pool loader."""

import collections

import numpy as np
import pytest

from alm_jax.data.metadata import ClipMeta, Speech
from alm_jax.data.records import AUDIO_PLACEHOLDER, Record
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes import pools
from alm_jax.recipes.desta import DestaRecipe
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS

SILENCE = np.zeros(16000, np.float32)


def test_pool_is_large_unique_and_keeps_the_original_order():
    assert 200 <= len(DESTA_INSTRUCTIONS) < 250      # < 250: 200 draws cover > 80 % (test_generation_engine)
    assert len(set(DESTA_INSTRUCTIONS)) == len(DESTA_INSTRUCTIONS)
    # the original 30, first to last, are still at indices 0..29
    assert DESTA_INSTRUCTIONS[0] == "Describe the audio in detail."
    assert DESTA_INSTRUCTIONS[3] == "Is there speech? What is said?"
    assert DESTA_INSTRUCTIONS[29] == "Write a detailed caption of this audio clip for a sound archive."
    assert all(s == s.strip() and s.rstrip("\"")[-1] in ".?!" for s in DESTA_INSTRUCTIONS)
    # every kind of instruction is there
    text = " ".join(DESTA_INSTRUCTIONS).lower()
    for marker in ("json", "haiku", "numbered list", "explain your reasoning", "yes or no", "one word"):
        assert marker in text, marker


def test_draws_are_balanced_per_block_and_keyed_by_seed_and_index():
    recipe, n = DestaRecipe(seed=4), len(DESTA_INSTRUCTIONS)
    for block in range(3):
        draws = [recipe.instruction_index(i) for i in range(block * n, (block + 1) * n)]
        assert sorted(draws) == list(range(n))       # each instruction exactly once per block
    assert [recipe.instruction_index(i) for i in (7, 900, 3)] == [DestaRecipe(seed=4).instruction_index(i)
                                                                  for i in (7, 900, 3)]
    first = [recipe.instruction_index(i) for i in range(n)]
    assert first != [recipe.instruction_index(i) for i in range(n, 2 * n)]          # blocks reshuffled
    assert first != [DestaRecipe(seed=5).instruction_index(i) for i in range(n)]    # seeds differ


def test_transcripts_are_stored_for_speech_clips_only():
    speech = ClipMeta("s", "t", 2.0, 16000, speech=(Speech("second part", 1.0, 1.8), Speech("hello there", 0.0, 0.9)))
    events = ClipMeta("e", "t", 2.0, 16000, labels=("bell",), caption="A bell rings.")
    recipe = DestaRecipe(seed=0)
    assert recipe.prepare(0, speech, SILENCE).metadata["transcripts"] == ["hello there second part"]
    assert "transcripts" not in recipe.prepare(0, events, SILENCE).metadata


def test_items_from_the_demo_source_make_valid_records():
    source = DemoSource(seed=6, n_clips=12, max_duration=3.0)
    recipe = DestaRecipe(seed=1)
    kinds = collections.Counter()
    for i in range(12):
        item = recipe.item_for(i, source)
        meta = source[i][0]
        kinds[meta.extra["kind"]] += 1
        user = item.generation_messages[1]["content"]
        instruction = item.metadata["instruction"]
        assert user.startswith("[Begin of audio]\n") and user.endswith(f"[End of audio]\n{instruction}")
        assert item.record_messages[1]["content"] == f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>\n" \
                                                     f"{item.metadata['instruction']}"
        assert item.skip_reason is None and item.fixed_response is None
        assert ("transcripts" in item.metadata) == bool(meta.speech)
        record = Record.from_bytes(item.to_record("A fake answer.", "fake-llm").to_bytes())
        assert record.messages[-1] == {"role": "assistant", "content": "A fake answer."}
        assert record.provenance.generator == "fake-llm" and record.metadata == item.metadata
    assert len(kinds) >= 2


def test_pool_loader_rejects_duplicates_empty_and_missing(monkeypatch):
    texts = {"dup.txt": "# c\nA?\nB?\nA?\n", "empty.txt": "# only a comment\n\n"}
    monkeypatch.setattr(pools, "_read", lambda name: texts[name])
    pools.text_pool.cache_clear()
    try:
        with pytest.raises(ConfigError, match="repeats"):
            pools.text_pool("dup.txt")
        with pytest.raises(ConfigError, match="no prompts"):
            pools.text_pool("empty.txt")
    finally:
        pools.text_pool.cache_clear()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="missing"):
        pools.text_pool("no-such-pool.txt")
    with pytest.raises(ConfigError, match="slots"):
        pools.check_templates("x", ["Is {label} here?"], allowed={"word"})
    with pytest.raises(ConfigError, match="slots"):
        pools.check_templates("x", ["No slot."], allowed={"label"}, required={"label"})


def test_small_backbone_options_hint_the_prompt_and_keep_answers_naming_a_present_sound():
    from alm_jax.recipes import build_recipe
    vocab = ("siren", "dog bark", "bell", "speech")
    meta = ClipMeta("e", "t", 2.0, 16000, labels=("dog bark", "speech"), label_vocabulary=vocab)
    out = lambda text: [type("Out", (), {"text": text})()]
    plain = DestaRecipe(seed=0).prepare(0, meta, SILENCE)
    assert "listened" not in plain.generation_messages[1]["content"]
    assert DestaRecipe(seed=0).finalize(plain, out("A mix of sounds.")).text == "A mix of sounds."   # default: kept
    recipe = build_recipe("desta", 0, listening_hint="true", require_label="true")
    item = recipe.prepare(0, meta, SILENCE)
    assert item.generation_messages[1]["content"].endswith("\n\n" + recipe.hint)
    assert item.record_messages[1]["content"].endswith(item.metadata["instruction"])   # training never sees the hint
    verdict = lambda text: (lambda t: t.text or t.reason)(recipe.finalize(item, out(text)))
    assert verdict("I hear dogs barking, then a bell.") == "I hear dogs barking, then a bell."
    assert verdict("A mix of music and sound effects.") == "names_no_label"
    assert verdict("The main sound is a siren, then a dog bark.") == "names_absent_label"   # the first named counts
    assert verdict("Answer as someone who has listened: a dog bark.") == "hint_echo"
    assert verdict("[00:00-00:02] (Audio category: dog bark") == "rejected_by_recipe"
    with pytest.raises(ConfigError, match="require_label must be true or false"):
        DestaRecipe(seed=0, require_label="yes")


def test_label_hint_names_the_clips_sound_classes_to_the_backbone_only():
    from alm_jax.recipes import build_recipe
    meta = ClipMeta("e", "t", 2.0, 16000, labels=("dog bark", "bell"), label_vocabulary=("siren", "dog bark", "bell"))
    out = lambda text: [type("Out", (), {"text": text})()]
    recipe = build_recipe("desta", 0, label_hint="true", require_label="true")
    item = recipe.prepare(0, meta, SILENCE)
    prompt = item.generation_messages[1]["content"]
    assert prompt.endswith("\n\n" + recipe.labels_hint.format(labels="dog bark and bell"))   # the labels, in order
    assert "siren" not in prompt and "listened" not in prompt                             # only what was asked
    assert "dog bark" not in item.record_messages[1]["content"]                           # training never sees it
    assert recipe.finalize(item, out("The sound is a bell.")).text == "The sound is a bell."
    assert recipe.finalize(item, out("Sound classes in this clip: bell.")).reason == "hint_echo"
    silent = recipe.prepare(0, ClipMeta("s", "t", 2.0, 16000, speech=(Speech("hi", 0.0, 1.0),)), SILENCE)   # no labels
    assert "Sound classes" not in silent.generation_messages[1]["content"]
    both = build_recipe("desta", 0, label_hint="true", listening_hint="true").prepare(0, meta, SILENCE)
    assert both.generation_messages[1]["content"].endswith(recipe.labels_hint.format(labels="dog bark and bell")
                                                          + "\n\n" + recipe.hint)
    with pytest.raises(ConfigError, match="label_hint must be true or false"):
        DestaRecipe(seed=0, label_hint=1)
