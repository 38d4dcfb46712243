"""The ALARM recipe: the backbone answers from the clip's description (stage 1), then the **same** model
rephrases its own answer so that it reads as listening, not reading (stage 2, self-rephrasing).

Stage 1 (`item.generation_messages`; ALARM generates at most 512 new tokens here)::

    system: You are a model that understands audio. Each audio clip reaches you between <start_audio> ...
    user:   <start_audio>[00:00-00:02] The baby finally fell asleep. (duration: 2s, gender: Female, ...)
            [00:01-00:02] |bell|<end_audio>

            What is happening in this audio? Think it through before answering.

Stage 2 (`stage_prompt(item, 1, [stage-1 output])`): the stage-1 answer with its reasoning tags `<think>` /
`</think>` renamed to the neutral `<text_reasoning>` / `</text_reasoning>` (so the model does not take it
for its own reasoning), in a chat whose system prompt gives the rewrite rules (keep structure and length;
turn text-perception phrases such as "mentioned", "provided", "the description" into listening phrases
such as "I hear", "it sounds like"; leave the model's own thinking phrases alone; never imply access to
text, metadata, labels or timestamps; do not complete a cut-off answer; never mention the audio tags) and
four few-shot pairs; the rewrite comes back between `<answer>` and `</answer>`. With a reasoning
backbone the stage-2 prompt asks the engine for budget forcing (`StagePrompt.thinking_budget`, 1536 by
default): past the budget inside `<think>`, the engine appends `budget_message` and lets it continue.

`finalize(item, [stage1, stage2], count_tokens)`: the text after the last `<answer>` up to `</answer>`,
with the original tags restored (`<think>` ... `</think>`; without `</think>` when the stage-1 reasoning
was cut off; without the opening `<think>` when the chat template writes it, `template_opens_think`).
Dropped (filtered reasons): `no_answer` (no `<answer>`), `empty_answer`, `mentions_metadata` (the
target still names the description, metadata, audio tags or a `[mm:ss-mm:ss]` / `|label|` form),
`response_too_short` / `response_too_long` (target tokens outside [min_response_tokens,
max_response_tokens]; ALARM: 100 and 612; 0 turns a bound off).

Before generation, `item_for` marks an item `skip_reason` `clip_too_long` (duration over
`max_clip_seconds`, ALARM: 60 s) or `asr_mismatch` (the clip has a reference transcript and an ASR
output, `meta.extra["asr_transcript"]` or the `asr(waveform, sample_rate)` callable, and their WER is over
`max_wer`, ALARM: 0.5 with Whisper-large-v3).

Training messages follow ALARM's data loader: no system prompt, the user turn is
`<start_audio><audio><end_audio>\\n\\n{prompt}` (the generation layout with the audio in place of its
description); the target is the rephrased answer, reasoning included. Record metadata: `item_index`,
`prompt`, `prompt_index`, `asr_wer` (None without one), `transcripts` (with speech); `finalize` adds
`original_response`, `target_tokens`, `reasoning` (`none`, `complete`, `cut`).

Differences from ALARM (`Blinorot/ALARM`, `scripts/alarm/generate_responses.py`): the texts are ours;
the prompts come from our pool (`prompts/alarm.json`; ALARM's per-clip questions come from a larger model,
whose script is not public); ALARM's optional third pass (a judge model flagging answers that reveal the
text description) is replaced by the `mentions_metadata` pattern check.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from alm_jax.data.seed_descriptions import alarm_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (END_AUDIO_TAG, START_AUDIO_TAG, GenerationItem, Output, Recipe, StagePrompt,
                                  Target, chat, clip_at, require_seed, training_audio, transcripts_metadata)
from alm_jax.recipes.pools import json_pool
from alm_jax.recipes.wer import word_error_rate

RECIPE_ID = "alarm"
ASR_TRANSCRIPT_KEY = "asr_transcript"     # ClipMeta.extra key of an ASR hypothesis for the WER gate
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_OPEN, REASONING_CLOSE = "<text_reasoning>", "</text_reasoning>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_PROMPT_STREAM = 0xA1A77
# Forms that show the target was written from text: the tags, bracketed timestamps, |label| bars,
# and phrases that name the description / metadata as a source.
_REVEALS_TEXT = re.compile(
    r"</?(?:start_audio|end_audio|text_reasoning|answer)>"
    r"|\[\d{1,}:\d{2}\s*-\s*\d{1,}:\d{2}\]"
    r"|\|[^|\s][^|\n]{0,80}[^|\s]\|"
    r"|\bmeta-?data\b"
    r"|\b(?:the|this|audio|text(?:ual)?|seed|provided|given) description\b"
    r"|\b(?:provided|given|listed) (?:text|transcript(?:ion)?|labels?|tags?|information|attributes?)\b"
    r"|\b(?:labels?|tags?|attributes?) (?:says?|indicates?|lists?|shows?)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Draft:
    """A stage-1 answer prepared for rephrasing.

    text: what stage 2 reads (reasoning between REASONING_OPEN / REASONING_CLOSE); has_reasoning: it
    reasoned; complete: its reasoning was closed; opened_by_template: the chat template wrote `<think>`.
    """
    text: str
    has_reasoning: bool
    complete: bool
    opened_by_template: bool


def prepare_draft(response: str, template_opens_think: bool = False) -> Draft:
    """Rename `<think>`/`</think>` in `response` to the neutral reasoning tags (see the module docstring).

    A response with `</think>` but no `<think>` (or any response, with `template_opens_think`) started
    inside the reasoning; a reasoning without `</think>` was cut off and is closed for the rewrite.
    """
    opens, closes = THINK_OPEN in response, THINK_CLOSE in response
    opened_by_template = not opens and (template_opens_think or closes)
    has_reasoning = opens or opened_by_template
    text = f"{THINK_OPEN}\n{response}" if opened_by_template else response
    if has_reasoning and not closes:
        text = f"{text}\n{THINK_CLOSE}"
    text = text.replace(THINK_OPEN, REASONING_OPEN).replace(THINK_CLOSE, REASONING_CLOSE)
    return Draft(text, has_reasoning, closes, opened_by_template)


def extract_answer(text: str) -> str | None:
    """The text after the last `<answer>` up to the next `</answer>` (or the end), stripped; None without one."""
    if ANSWER_OPEN not in text:
        return None
    return text.rsplit(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0].strip()


def restore_tags(rephrased: str, draft: Draft) -> str:
    """The rephrased answer with the draft's original reasoning tags back (see the module docstring)."""
    if not draft.has_reasoning:
        return rephrased.replace(REASONING_OPEN, "").replace(REASONING_CLOSE, "").strip()
    text = rephrased.replace(REASONING_OPEN, "" if draft.opened_by_template else THINK_OPEN)
    text = text.replace(REASONING_CLOSE, THINK_CLOSE if draft.complete else "")
    return text.strip()


def reveals_text(text: str) -> bool:
    """True when `text` still shows that it was written from a description (see `_REVEALS_TEXT`)."""
    return _REVEALS_TEXT.search(text) is not None


def budget_continuation(partial: str, budget_message: str) -> str:
    """What the engine appends to a stage output cut at its thinking budget before generating on:
    `budget_message` while the text is still inside `<think>` (no `</think>` yet), else nothing."""
    return budget_message if THINK_CLOSE not in partial else ""


class AlarmRecipe(Recipe):
    """ALARM self-rephrasing, two LLM passes (see the module docstring).

    min_response_tokens / max_response_tokens: target length bounds in backbone tokens (0: no bound);
    max_clip_seconds, max_wer: the pre-generation filters (0: off); template_opens_think: the backbone's
    chat template opens `<think>` itself (Qwen3-*-Thinking-2507); thinking_budget: stage-2 tokens inside
    `<think>` before budget forcing (0: none); rephrase_max_new_tokens: stage-2 cap (0: the engine's);
    leak_filter: drop targets that still reveal the text; prefill_answer: start the stage-2 assistant turn
    with `<answer>` (for small backbones that do not open the tag themselves; ALARM: off); asr: optional `(waveform float32 [samples],
    sample_rate) -> transcript` for the WER gate when the clip metadata holds no ASR output.
    """
    recipe_id = RECIPE_ID
    n_stages = 2

    def __init__(self, seed: int = 0, *, min_response_tokens: int = 100, max_response_tokens: int = 612,
                 max_clip_seconds: float = 60.0, max_wer: float = 0.5, template_opens_think: bool = False,
                 thinking_budget: int = 1536, rephrase_max_new_tokens: int = 0, leak_filter: bool = True,
                 prefill_answer: bool = False, asr: Callable[[np.ndarray, int], str] | None = None):
        super().__init__(seed)
        for name, value in (("min_response_tokens", min_response_tokens), ("max_response_tokens", max_response_tokens),
                            ("thinking_budget", thinking_budget), ("rephrase_max_new_tokens", rephrase_max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"AlarmRecipe: {name} must be an int >= 0 (0: off), got {value!r}")
        if max_response_tokens and min_response_tokens > max_response_tokens:
            raise ConfigError(f"AlarmRecipe: min_response_tokens {min_response_tokens} exceeds max_response_tokens "
                              f"{max_response_tokens}")
        for name, value in (("max_clip_seconds", max_clip_seconds), ("max_wer", max_wer)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"AlarmRecipe: {name} must be a number >= 0 (0: off), got {value!r}")
        if asr is not None and not callable(asr):
            raise ConfigError(f"AlarmRecipe: asr must be a callable (waveform, sample_rate) -> str, got {asr!r}")
        self.min_response_tokens, self.max_response_tokens = min_response_tokens, max_response_tokens
        self.max_clip_seconds, self.max_wer = float(max_clip_seconds), float(max_wer)
        self.template_opens_think, self.leak_filter = bool(template_opens_think), bool(leak_filter)
        self.thinking_budget, self.rephrase_max_new_tokens = thinking_budget, rephrase_max_new_tokens
        self.prefill_answer = bool(prefill_answer)
        self.asr = asr
        pool = json_pool("alarm.json")
        self.system_prompt, self.prompts = pool["system"], tuple(pool["prompts"])
        self.rephrase_user, self.budget_message = pool["rephrase_user"], pool["budget_message"]
        if "{response}" not in self.rephrase_user or not self.prompts:
            raise ConfigError("prompts/alarm.json: rephrase_user needs a {response} slot and prompts must not be empty")
        self.rephrase_system = pool["rephrase_system"] + "".join(
            f"<ORIGINAL_ANSWER_{k}>\n{pair['response']}\n</ORIGINAL_ANSWER_{k}>\n"
            f"<EDITED_ANSWER_{k}>\n{ANSWER_OPEN}\n{pair['rephrased']}\n{ANSWER_CLOSE}\n</EDITED_ANSWER_{k}>\n\n"
            for k, pair in enumerate(pool["few_shot"], 1))

    def prompt_index(self, index: int) -> int:
        """Index into `prompts` of item `index`: balanced, each block of len(prompts) items uses all once."""
        block, position = divmod(int(index), len(self.prompts))
        return int(self.rng(block, _PROMPT_STREAM).permutation(len(self.prompts))[position])

    def skip_reason(self, meta, waveform: np.ndarray) -> tuple[str | None, float | None]:
        """(why the clip is filtered before generation or None, the ASR WER or None)."""
        if self.max_clip_seconds and meta.duration > self.max_clip_seconds:
            return "clip_too_long", None
        reference = meta.transcript
        if not reference:
            return None, None
        hypothesis = meta.extra.get(ASR_TRANSCRIPT_KEY)
        if hypothesis is None and self.asr is not None:
            hypothesis = self.asr(waveform, meta.sample_rate)
        if hypothesis is None:
            return None, None
        wer = word_error_rate(reference, str(hypothesis))
        return ("asr_mismatch" if self.max_wer and wer > self.max_wer else None), wer

    def item_for(self, index: int, source) -> GenerationItem:
        """Item `index`: clip `index % len(source)`, its ALARM description and a pool prompt (stage 1)."""
        meta, waveform = clip_at(source, index)
        description = require_seed(alarm_seed_description(meta), meta)
        k = self.prompt_index(index)
        prompt = self.prompts[k]
        skip, wer = self.skip_reason(meta, waveform)
        user = f"{START_AUDIO_TAG}{description}{END_AUDIO_TAG}\n\n{prompt}"
        return GenerationItem(
            generation_messages=chat(self.system_prompt, user),
            record_messages=[{"role": "user", "content": f"{training_audio(1)}\n\n{prompt}"}],
            clips=[(meta, waveform)], seed_descriptions=[description], recipe=self.recipe_id, source=meta.source,
            item_id=meta.clip_id, seed=self.seed, skip_reason=skip,
            metadata={"item_index": int(index), "prompt": prompt, "prompt_index": k, "asr_wer": wer,
                      **transcripts_metadata([meta])})

    def accepts(self, response: str) -> bool:
        """Every stage-1 answer goes on to stage 2 (a reasoning trace quotes the description; the rewrite
        and `finalize` deal with that)."""
        return True

    def draft(self, response: str) -> Draft:
        return prepare_draft(response, self.template_opens_think)

    def stage_prompt(self, item: GenerationItem, stage: int, outputs: Sequence[Output]) -> StagePrompt:
        """Stage 1 (the second pass): the rephrasing chat of the stage-0 answer `outputs[0].text`."""
        if stage != 1 or len(outputs) != 1:
            raise ConfigError(f"AlarmRecipe has stages 0 and 1; stage_prompt wants stage 1 with one earlier "
                              f"output, got stage {stage} with {len(outputs)}")
        user = self.rephrase_user.replace("{response}", self.draft(outputs[0].text).text)
        return StagePrompt(chat(self.rephrase_system, user), max_new_tokens=self.rephrase_max_new_tokens or None,
                           thinking_budget=self.thinking_budget or None, budget_message=self.budget_message,
                           assistant_prefix=f"{ANSWER_OPEN}\n" if self.prefill_answer else "")

    def finalize(self, item: GenerationItem, outputs: Sequence[Output],
                 count_tokens: Callable[[str], int] | None = None) -> Target:
        """The rephrased target of `item` from [stage-1 answer, stage-2 rewrite], or why it is dropped."""
        if len(outputs) != 2:
            raise ConfigError(f"AlarmRecipe.finalize needs the outputs of both stages, got {len(outputs)}")
        draft = self.draft(outputs[0].text)
        reasoning = "none" if not draft.has_reasoning else "complete" if draft.complete else "cut"
        extracted = extract_answer(outputs[1].text)
        if extracted is None:
            return Target.drop("no_answer")
        target = restore_tags(extracted, draft)
        if not target:
            return Target.drop("empty_answer")
        if self.leak_filter and reveals_text(target):
            return Target.drop("mentions_metadata")
        n_tokens = None
        if self.min_response_tokens or self.max_response_tokens:
            if count_tokens is None:
                raise ConfigError("AlarmRecipe.finalize needs count_tokens (the backbone tokenizer's token count "
                                  "of a text) for its length filter; pass it, or set min_response_tokens=0 and "
                                  "max_response_tokens=0")
            n_tokens = int(count_tokens(target))
            if n_tokens < self.min_response_tokens:
                return Target.drop("response_too_short")
            if self.max_response_tokens and n_tokens > self.max_response_tokens:
                return Target.drop("response_too_long")
        return Target.keep(target, original_response=outputs[0].text, target_tokens=n_tokens, reasoning=reasoning)
