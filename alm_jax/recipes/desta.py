"""The DeSTA2.5 recipe: a clip's seed description + a sampled instruction -> the backbone LLM's answer.

For item `index` with clip `(meta, waveform)`, `DestaRecipe(seed).prepare(index, meta, waveform)` gives a
`GenerationItem` holding

- the **generation prompt** (what the backbone LLM reads, the audio replaced by its text)::

      system: You are a helpful assistant.
      user:   [Begin of audio]
              [00:00-00:04] (Audio category: bell, Duration: 3s)
              [End of audio]
              Describe the audio in detail.

- the **training messages** (what the ALM is trained on; the assistant turn is the LLM's answer)::

      system:    You are a helpful assistant. The audio clips appear between <start_audio> and <end_audio> tags.
      user:      <start_audio><audio><end_audio>
                 Describe the audio in detail.
      assistant: <generated response>

- **record metadata**: `item_index`, `instruction`, `instruction_index`, and `transcripts` (`[the clip's
  transcript]`, only when the clip has speech): the text DeSTA appends as tokens after the audio tokens.

Instruction draws are balanced: items `[b * P, (b + 1) * P)` (P = pool size) use every instruction once,
in an order shuffled by `(seed, b)`; so item `index` depends on `(seed, index)` only and any item can be
rebuilt alone. Relation to DeSTA2.5 (`kehanlu/DeSTA2.5-Audio`, see methods-digest.md): the seed format and
the training system prompt are theirs; their generation script is not released, so the `[Begin of audio]`
/ `[End of audio]` bracketing is taken from BALSa (same lab, same idea), and the generation system prompt
is a plain assistant prompt. Their training example puts the instruction before the audio; here the
audio comes first, the order the generation prompt uses. The instruction pool is ours (theirs is not
public).

Three options for small backbones (ours, not the paper's; off by default): `listening_hint` appends the
recipes' listening hint (`prompts/balsa.json`: answer as someone who heard the clip) to the generation
prompt, the prompt the alignment suite's backbone reference uses; `label_hint` appends the clip's sound
classes (its metadata labels, "Sound classes in this clip: bell. Name the sound in your answer ..."), as
BALSa's `answer_hint` states a yes/no answer; `require_label` keeps only answers whose first named sound class
(`read_label` over the clip's label vocabulary) is one of the clip's labels, dropping `names_no_label` /
`names_absent_label` (SmolLM2-135M named a present class in 168 of 657 answers without them: a target that
names nothing teaches the ALM an answer that fits every clip; on single-event clips it kept 17 of 64 answers
without `label_hint`, 57 of 64 with it). An answer that copies a hint is dropped (`hint_echo`). The training
prompt never carries a hint.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from alm_jax.data.metadata import ClipMeta
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (BEGIN_AUDIO, END_AUDIO, END_AUDIO_TAG, GENERATION_SYSTEM_PROMPT,  # noqa: F401
                                  START_AUDIO_TAG, TRAINING_SYSTEM_PROMPT, GenerationItem, Output, Recipe, Target,
                                  chat, clip_at, generation_audio, hint_head, join_words, read_label, require_seed,
                                  training_audio, transcripts_metadata)
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS
from alm_jax.recipes.pools import json_pool

RECIPE_ID = "desta"
# Mixed into the instruction RNG key so it draws independently of a source that uses the same seed.
_INSTRUCTION_STREAM = 0xDE57A


class DestaRecipe(Recipe):
    """DeSTA2.5 self-generated alignment for single clips (see the module docstring).

    seed: int >= 0, keys the instruction draw; instructions: the pool to draw from; listening_hint,
    label_hint, require_label: the small-backbone options of the module docstring.
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, instructions: Sequence[str] = DESTA_INSTRUCTIONS,
                 listening_hint: bool = False, require_label: bool = False, label_hint: bool = False):
        super().__init__(seed)
        if isinstance(instructions, str) or not instructions or not all(
                isinstance(s, str) and s.strip() for s in instructions):
            raise ConfigError("DestaRecipe: instructions must be a non-empty sequence of non-empty strings")
        for key, value in (("listening_hint", listening_hint), ("require_label", require_label),
                           ("label_hint", label_hint)):
            if not isinstance(value, bool):
                raise ConfigError(f"DestaRecipe: {key} must be true or false, got {value!r}")
        self.instructions = tuple(instructions)
        self.listening_hint, self.require_label, self.label_hint = listening_hint, require_label, label_hint
        hints = json_pool("balsa.json")["hints"]
        self.hint, self.labels_hint = hints["listening"], hints["labels"]

    def instruction_index(self, index: int) -> int:
        """Index into `instructions` of item `index` (depends on `(seed, index)` only; balanced per block)."""
        block, position = divmod(int(index), len(self.instructions))
        order = np.random.default_rng([self.seed, _INSTRUCTION_STREAM, block]).permutation(len(self.instructions))
        return int(order[position])

    def generation_messages(self, seed_description: str, instruction: str,
                            labels: Sequence[str] = ()) -> list[dict[str, str]]:
        """The backbone LLM's chat: the audio given as its seed description between bracket markers, then the
        instruction and the hints the options ask for (`labels`: the clip's sound classes, for `label_hint`)."""
        hints = [self.labels_hint.format(labels=join_words(labels, "and"))] if self.label_hint and labels else []
        hints += [self.hint] if self.listening_hint else []
        hint = "".join(f"\n\n{h}" for h in hints)
        return chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio([seed_description])}\n{instruction}{hint}")

    def record_messages(self, instruction: str) -> list[dict[str, str]]:
        """The training chat without its assistant turn: the audio placeholder between tags, then the instruction."""
        return chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{instruction}")

    def prepare(self, index: int, meta: ClipMeta, waveform: np.ndarray) -> GenerationItem:
        """The `GenerationItem` of item `index` for clip `meta` (+ its waveform float32 `[samples]`).

        Raises `DataError` (kind `empty_seed_description`) when nothing is known about the clip.
        """
        seed_description = require_seed(desta_seed_description(meta), meta)
        k = self.instruction_index(index)
        instruction = self.instructions[k]
        return GenerationItem(
            generation_messages=self.generation_messages(seed_description, instruction, meta.labels),
            record_messages=self.record_messages(instruction), clips=[(meta, waveform)],
            seed_descriptions=[seed_description], recipe=self.recipe_id, source=meta.source,
            item_id=meta.clip_id, seed=self.seed,
            metadata={"item_index": int(index), "instruction": instruction, "instruction_index": k,
                      **transcripts_metadata([meta])})

    def item_for(self, index: int, source) -> GenerationItem:
        """The item of corpus position `index`: clip `index % len(source)` of a `source[i] -> (meta, wave)`.

        Past the end of the source the clips repeat, each time with a freshly drawn instruction.
        """
        meta, waveform = clip_at(source, index)
        return self.prepare(index, meta, waveform)

    def finalize(self, item: GenerationItem, outputs: Sequence[Output],
                 count_tokens: Callable[[str], int] | None = None) -> Target:
        """The answer as target unless it echoes the seed markup or the hint, or (`require_label`) its first
        named sound class is missing or not one of the clip's labels."""
        target = super().finalize(item, outputs, count_tokens)
        if not target.kept:
            return target
        text = target.text
        for on, hint in ((self.listening_hint, self.hint), (self.label_hint, self.labels_hint)):
            if on and hint_head(hint) in text.lower():
                return Target.drop("hint_echo")
        if self.require_label:
            meta = item.clips[0][0]
            named = read_label(text, meta.label_vocabulary or meta.labels)
            if named is None:
                return Target.drop("names_no_label")
            if named not in meta.labels:
                return Target.drop("names_absent_label")
        return target
