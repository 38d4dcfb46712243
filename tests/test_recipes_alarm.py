"""ALARM: stage-1 prompt, stage-2 self-rephrasing prompt (tag renaming, rules, few-shot), `<answer>`
extraction and tag restoration, the length / leak / duration / WER filters, and the WER function."""

import dataclasses

import numpy as np
import pytest

from alm_jax.data.metadata import ClipMeta, Event, Speech
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import alarm_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes import pools
from alm_jax.recipes.alarm import (AlarmRecipe, budget_continuation, extract_answer, prepare_draft, restore_tags,
                                   reveals_text)
from alm_jax.recipes.base import StagePrompt
from alm_jax.recipes.wer import edit_distance, normalize_words, word_error_rate

WAVE = np.zeros(16000, np.float32)
SPEECH = ClipMeta("spk-1", "fake", 2.0, 16000,
                  speech=(Speech("It is eleven o'clock.", 0.0, 1.6, {"gender": "male", "emotion": "happy"}),))
SOUND = ClipMeta("snd-1", "fake", 6.0, 16000, labels=("dog bark",), events=(Event("dog bark", 1.0, 3.5),),
                 attributes={"background": "pink noise", "snr_db": 10.0})


@dataclasses.dataclass
class Out:
    text: str
    n_tokens: int = 50
    finished: bool = True


class Clips:
    def __init__(self, *metas):
        self.metas = metas

    def __len__(self):
        return len(self.metas)

    def __getitem__(self, i):
        return self.metas[i], WAVE


def words(text: str) -> int:
    return len(text.split())


def test_stage_one_prompt_and_record_template():
    recipe = AlarmRecipe(seed=0)
    item = recipe.item_for(0, Clips(SOUND))
    system, user = (m["content"] for m in item.generation_messages)
    assert "audio" in system and "<start_audio>" in system and "Listen" in system
    prompt = item.metadata["prompt"]
    assert user == f"<start_audio>{alarm_seed_description(SOUND)}<end_audio>\n\n{prompt}"
    assert item.record_messages == [{"role": "user", "content": f"<start_audio><audio><end_audio>\n\n{prompt}"}]
    assert item.skip_reason is None and item.metadata["asr_wer"] is None and recipe.n_stages == 2
    assert recipe.accepts("<think>The description says [00:01-00:04] |dog bark|.</think> A dog barks.")
    draws = [recipe.prompt_index(i) for i in range(len(recipe.prompts))]
    assert sorted(draws) == list(range(len(recipe.prompts)))         # balanced per block


def test_stage_two_renames_reasoning_and_carries_rules_and_examples():
    recipe = AlarmRecipe(seed=0)
    item = recipe.item_for(0, Clips(SPEECH))
    stage1 = Out("<think>\nThe description gives emotion: happy.\n</think>\n\nThe speaker is happy.")
    prompt = recipe.stage_prompt(item, 1, [stage1])
    assert isinstance(prompt, StagePrompt) and prompt.thinking_budget == 1536 and prompt.max_new_tokens is None
    system, user = (m["content"] for m in prompt.messages)
    assert "<text_reasoning>\nThe description gives emotion: happy.\n</text_reasoning>" in user
    assert "<think>" not in user and "</think>" not in user
    for rule in ("I hear", "metadata", "do not finish it", "<start_audio>", "<answer>"):
        assert rule in system, rule
    assert system.count("<ORIGINAL_ANSWER_") == 4 and system.count("<EDITED_ANSWER_") == 4
    assert budget_continuation("<think>still thinking", prompt.budget_message) == prompt.budget_message
    assert prompt.budget_message.rstrip().endswith("</think>")
    assert budget_continuation("<think>done</think> answer", prompt.budget_message) == ""
    with pytest.raises(ConfigError, match="stage"):
        recipe.stage_prompt(item, 2, [stage1, stage1])
    assert AlarmRecipe(thinking_budget=0, rephrase_max_new_tokens=900).stage_prompt(item, 1, [stage1]) \
        .thinking_budget is None


def test_few_shot_edits_are_clean_examples():
    for pair in pools.json_pool("alarm.json")["few_shot"]:
        draft = prepare_draft(pair["response"].replace("<text_reasoning>", "<think>")
                              .replace("</text_reasoning>", "</think>"))
        assert not reveals_text(restore_tags(pair["rephrased"], draft)), pair["rephrased"][:80]
    originals = [p["response"] for p in pools.json_pool("alarm.json")["few_shot"]]
    assert sum(reveals_text(o.replace("<text_reasoning>", "").replace("</text_reasoning>", "")) for o in originals) >= 3


@pytest.mark.parametrize("stage1, template_opens, rephrased, target, reasoning", [
    # reasoning opened by the model itself, complete
    ("<think>\nThe tags say happy.\n</think>\n\nHappy.", False,
     "<answer>\n<text_reasoning>\nI hear a happy voice.\n</text_reasoning>\n\nHappy.\n</answer>",
     "<think>\nI hear a happy voice.\n</think>\n\nHappy.", "complete"),
    # the chat template opened <think> (Qwen3 thinking): the target starts inside the reasoning
    ("The tags say happy.\n</think>\n\nHappy.", False,
     "<think>my own rewriting thoughts</think><answer><text_reasoning>\nI hear a happy voice.\n"
     "</text_reasoning>\n\nHappy.</answer>",
     "I hear a happy voice.\n</think>\n\nHappy.", "complete"),
    # reasoning cut off at the token limit: closed for the rewrite, left open in the target
    ("<think>\nThe tags say hap", False,
     "<answer><text_reasoning>\nI hear a hap\n</text_reasoning></answer>", "<think>\nI hear a hap", "cut"),
    ("The tags say hap", True,
     "<answer><text_reasoning>\nI hear a hap\n</text_reasoning></answer>", "I hear a hap", "cut"),
    # a backbone without reasoning: a plain answer
    ("The provided labels say a dog barks.", False,
     "<answer>\nI hear a dog barking.\n</answer>", "I hear a dog barking.", "none"),
])
def test_finalize_extracts_and_restores(stage1, template_opens, rephrased, target, reasoning):
    recipe = AlarmRecipe(seed=0, min_response_tokens=1, template_opens_think=template_opens)
    item = recipe.item_for(0, Clips(SPEECH))
    prompt_user = recipe.stage_prompt(item, 1, [Out(stage1)]).messages[1]["content"]
    if reasoning != "none":
        assert "<text_reasoning>\n" in prompt_user and "</text_reasoning>" in prompt_user
    else:
        assert "text_reasoning" not in prompt_user
    result = recipe.finalize(item, [Out(stage1), Out(rephrased)], count_tokens=words)
    assert result.text == target, result
    assert result.metadata == {"original_response": stage1, "target_tokens": words(target), "reasoning": reasoning}
    record = Record.from_bytes(item.to_record(result.text, "qwen", extra_metadata=result.metadata).to_bytes())
    assert record.messages[-1]["content"] == target and record.metadata["reasoning"] == reasoning


def test_finalize_filters():
    recipe = AlarmRecipe(seed=0, min_response_tokens=3, max_response_tokens=8)
    item = recipe.item_for(0, Clips(SOUND))
    stage1 = Out("A dog barks.")
    verdict = lambda text: recipe.finalize(item, [stage1, Out(text)], count_tokens=words)  # noqa: E731
    assert verdict("I hear a dog bark over a hiss.").reason == "no_answer"
    assert verdict("<answer>  </answer>").reason == "empty_answer"
    assert verdict("<answer>Too short.</answer>").reason == "response_too_short"
    assert verdict("<answer>" + "word " * 9 + "</answer>").reason == "response_too_long"
    assert verdict("<answer>I hear a dog barking loudly.</answer>").text == "I hear a dog barking loudly."
    for leak in ("The metadata says a dog barks here.", "At [00:01-00:04] a dog barks.",
                 "I hear a |dog bark| sound clearly.", "According to the description, a dog barks.",
                 "The provided labels mention a dog.", "A dog barks <end_audio> there."):
        assert verdict(f"<answer>{leak}</answer>").reason == "mentions_metadata", leak
        assert AlarmRecipe(min_response_tokens=0, max_response_tokens=0, leak_filter=False).finalize(
            item, [stage1, Out(f"<answer>{leak}</answer>")]).kept
    with pytest.raises(ConfigError, match="count_tokens"):
        recipe.finalize(item, [stage1, Out("<answer>I hear a dog bark.</answer>")])
    with pytest.raises(ConfigError, match="both stages"):
        recipe.finalize(item, [stage1], count_tokens=words)


def test_duration_and_wer_gates_skip_before_generation():
    long_clip = dataclasses.replace(SOUND, clip_id="long", duration=75.0)
    good_asr = dataclasses.replace(SPEECH, clip_id="good", extra={"asr_transcript": "it is eleven o clock"})
    bad_asr = dataclasses.replace(SPEECH, clip_id="bad", extra={"asr_transcript": "a dog is eating"})
    recipe = AlarmRecipe(seed=0)
    source = Clips(long_clip, good_asr, bad_asr, SPEECH)
    items = [recipe.item_for(i, source) for i in range(4)]
    assert [it.skip_reason for it in items] == ["clip_too_long", None, "asr_mismatch", None]
    assert items[1].metadata["asr_wer"] == pytest.approx(2 / 4)     # "o'clock" -> "o clock": 1 sub + 1 ins
    assert items[2].metadata["asr_wer"] == 1.0 and items[3].metadata["asr_wer"] is None
    assert items[1].metadata["transcripts"] == ["It is eleven o'clock."]
    calls = []
    with_asr = AlarmRecipe(seed=0, asr=lambda wave, sr: calls.append(sr) or "It is eleven o'clock")
    assert with_asr.item_for(3, source).metadata["asr_wer"] == 0.0 and calls == [16000]
    assert with_asr.item_for(0, source).skip_reason == "clip_too_long" and calls == [16000]   # no ASR needed
    off = AlarmRecipe(seed=0, max_clip_seconds=0, max_wer=0)
    assert [off.item_for(i, source).skip_reason for i in range(4)] == [None] * 4


def test_settings_errors():
    for bad, match in (({"min_response_tokens": -1}, "min_response_tokens"),
                       ({"min_response_tokens": 700}, "exceeds"), ({"max_wer": -0.1}, "max_wer"),
                       ({"asr": "whisper"}, "asr"), ({"thinking_budget": 1.5}, "thinking_budget")):
        with pytest.raises(ConfigError, match=match):
            AlarmRecipe(**bad)


def test_word_error_rate():
    assert normalize_words("Hello, World!  It's 5 o'clock.") == ["hello", "world", "it's", "5", "o'clock"]
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("hello world", "hello word") == 0.5
    assert word_error_rate("a b c d", "a x c") == 0.5                  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d e") == 1.5                  # insertions can push it past 1
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == 1.0
    assert word_error_rate("the cat", "") == 1.0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert extract_answer("no tags") is None
    assert extract_answer("<think>I will write <answer> tags</think><answer>\n final \n</answer> junk") == "final"
