"""MATS: text-only records (no audio bytes) with the embedded text in metadata; caption / classify targets
from metadata, QA answered by the LLM from the embedded text only."""

import collections

import numpy as np
import pytest

from alm_jax.data.metadata import ClipMeta, Speech
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS
from alm_jax.recipes.mats import TEXT_AUDIO_PLACEHOLDER, MatsRecipe


@pytest.fixture(scope="module")
def source():
    return DemoSource(seed=8, n_clips=30, max_duration=3.0)


def test_records_are_text_only_and_carry_the_embedded_text(source):
    recipe = MatsRecipe(seed=2)
    tasks = collections.Counter()
    for i in range(len(source)):
        meta = source[i][0]
        item = recipe.item_for(i, source)
        md = item.metadata
        tasks[md["task"]] += 1
        assert item.clips == [] and md["text_only"] is True and md["audio_texts"] == [meta.caption]
        assert item.seed_descriptions == [meta.caption] and md["clip_id"] == meta.clip_id
        assert item.record_messages[1]["content"] == (f"<start_audio>{TEXT_AUDIO_PLACEHOLDER}<end_audio>\n"
                                                      f"{md['instruction']}")
        # the LLM sees exactly the embedded text, nothing the embedding cannot carry
        assert item.generation_messages[1]["content"] == (f"[Begin of audio]\n{meta.caption}\n[End of audio]\n"
                                                          f"{md['instruction']}")
        if md["task"] == "caption":
            assert item.fixed_response == meta.caption
        elif md["task"] == "classify":
            assert item.fixed_response == ", ".join(meta.labels)
        else:
            assert item.fixed_response is None and md["instruction"] in DESTA_INSTRUCTIONS
        record = Record.from_bytes(item.to_record(item.fixed_response or "An answer.", "llm").to_bytes())
        assert record.clips == [] and record.audio_seconds == 0 and record.metadata["audio_texts"] == [meta.caption]
        assert record.provenance.generator == ("metadata" if item.fixed_response else "llm")
    assert set(tasks) == {"caption", "classify", "qa"}


def test_task_weights_embed_text_and_fallbacks(source):
    assert {MatsRecipe(seed=0, caption=0, classify=0).item_for(i, source).metadata["task"] for i in range(10)} == {"qa"}
    desta = MatsRecipe(seed=0, embed_text="desta").item_for(4, source)
    assert desta.metadata["audio_texts"] == [desta_seed_description(source[4][0])]
    bare = ClipMeta("b", "fake", 1.0, 16000, speech=(Speech("hello", 0.0, 0.5),))
    item = MatsRecipe(seed=0, caption=1, classify=0, qa=0).item_for(0, [(bare, np.zeros(10, np.float32))])
    assert item.metadata["task"] == "qa" and item.metadata["fallback"] == "no_caption"
    assert item.metadata["audio_texts"] == [desta_seed_description(bare)]           # no caption: the seed text
    with pytest.raises(ConfigError, match="embed_text"):
        MatsRecipe(embed_text="clap")
