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

The instruction is drawn uniformly from `DESTA_INSTRUCTIONS` by an RNG keyed on `(seed, index)` only, so
any item can be rebuilt alone. Relation to DeSTA2.5 (`kehanlu/DeSTA2.5-Audio`, see methods-digest.md):
the seed format and the training system prompt are theirs; their generation script is not released, so
the `[Begin of audio]` / `[End of audio]` bracketing is taken from BALSa (same lab, same idea), and the
generation system prompt is a plain assistant prompt. Their training example puts the instruction before
the audio (`"Describe the audio file. <start_audio><|AUDIO|><end_audio>"`); here the audio comes first,
the order the generation prompt uses. The instruction pool is ours (theirs is not public).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from alm_jax.data.bad_data import data_error
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Provenance, Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS

RECIPE_ID = "desta"
GENERATION_SYSTEM_PROMPT = "You are a helpful assistant."
TRAINING_SYSTEM_PROMPT = ("You are a helpful assistant. The audio clips appear between <start_audio> and "
                          "<end_audio> tags.")
BEGIN_AUDIO, END_AUDIO = "[Begin of audio]", "[End of audio]"
START_AUDIO_TAG, END_AUDIO_TAG = "<start_audio>", "<end_audio>"
# A copied seed line (`[00:01-00:03] (Audio category: ...`) or an audio marker in a response.
_ECHO = re.compile(r"\[(?:begin|end) of audio\]|\[\d{2,}:\d{2}-\d{2,}:\d{2}\]\s*\(", re.IGNORECASE)
# Mixed into the instruction RNG key so it draws independently of a source that uses the same seed.
_INSTRUCTION_STREAM = 0xDE57A


@dataclasses.dataclass
class GenerationItem:
    """What a recipe makes of one corpus item before the LLM answers: prompt, clips, record template.

    `generation_messages`: the chat the backbone LLM continues (system + user, audio as text);
    `record_messages`: the training chat without its final assistant turn; `clips`: (meta, waveform
    float32 `[samples]`) per `AUDIO_PLACEHOLDER`, in order; `metadata` goes into the record as is.
    """
    generation_messages: list[dict[str, str]]
    record_messages: list[dict[str, str]]
    clips: list[tuple[ClipMeta, np.ndarray]]
    seed_descriptions: list[str]
    recipe: str
    source: str
    item_id: str
    seed: int
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_record(self, response: str, generator: str, audio_format: str = "flac",
                  extra_metadata: dict[str, Any] | None = None) -> Record:
        """The training `Record`: clips encoded as `audio_format`, `response` as the assistant turn."""
        clips = [AudioClip.from_wave(wave, meta.sample_rate, audio_format, meta=meta) for meta, wave in self.clips]
        return Record(
            clips=clips,
            messages=[*self.record_messages, {"role": "assistant", "content": response}],
            seed_descriptions=list(self.seed_descriptions), recipe=self.recipe,
            provenance=Provenance(source=self.source, item_id=self.item_id, generator=generator, seed=self.seed),
            metadata={**self.metadata, **(extra_metadata or {})})


class DestaRecipe:
    """DeSTA2.5 self-generated alignment for single clips (see the module docstring).

    seed: int >= 0, keys the instruction draw; instructions: the pool to draw from.
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, instructions: Sequence[str] = DESTA_INSTRUCTIONS):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"DestaRecipe: seed must be an int >= 0, got {seed!r}")
        if isinstance(instructions, str) or not instructions or not all(
                isinstance(s, str) and s.strip() for s in instructions):
            raise ConfigError("DestaRecipe: instructions must be a non-empty sequence of non-empty strings")
        self.seed, self.instructions = int(seed), tuple(instructions)

    def instruction_index(self, index: int) -> int:
        """Index into `instructions` of item `index` (depends on `(seed, index)` only)."""
        rng = np.random.default_rng([self.seed, _INSTRUCTION_STREAM, int(index)])
        return int(rng.integers(len(self.instructions)))

    def generation_messages(self, seed_description: str, instruction: str) -> list[dict[str, str]]:
        """The backbone LLM's chat: the audio given as its seed description between bracket markers."""
        user = f"{BEGIN_AUDIO}\n{seed_description}\n{END_AUDIO}\n{instruction}"
        return [{"role": "system", "content": GENERATION_SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def record_messages(self, instruction: str) -> list[dict[str, str]]:
        """The training chat without its assistant turn: the audio placeholder between tags, then the instruction."""
        user = f"{START_AUDIO_TAG}{AUDIO_PLACEHOLDER}{END_AUDIO_TAG}\n{instruction}"
        return [{"role": "system", "content": TRAINING_SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def prepare(self, index: int, meta: ClipMeta, waveform: np.ndarray) -> GenerationItem:
        """The `GenerationItem` of item `index` for clip `meta` (+ its waveform float32 `[samples]`).

        Raises `DataError` (kind `empty_seed_description`) when nothing is known about the clip.
        """
        seed_description = desta_seed_description(meta)
        if not seed_description.strip():
            raise data_error("empty_seed_description", f"clip {meta.clip_id!r} ({meta.source}) has no caption, "
                                                       "labels, events, speech or background to describe")
        k = self.instruction_index(index)
        instruction = self.instructions[k]
        return GenerationItem(
            generation_messages=self.generation_messages(seed_description, instruction),
            record_messages=self.record_messages(instruction), clips=[(meta, waveform)],
            seed_descriptions=[seed_description], recipe=self.recipe_id, source=meta.source,
            item_id=meta.clip_id, seed=self.seed,
            metadata={"item_index": int(index), "instruction": instruction, "instruction_index": k})

    def accepts(self, response: str) -> bool:
        """False for a response that echoes the seed description's markup (an audio marker, or a
        `[mm:ss-mm:ss] (` line) instead of answering: small backbones often do, and such a target would teach
        the ALM to read metadata aloud."""
        return _ECHO.search(response) is None

    def item_for(self, index: int, source) -> GenerationItem:
        """The item of corpus position `index`: clip `index % len(source)` of a `source[i] -> (meta, wave)`.

        Past the end of the source the clips repeat, each time with a freshly drawn instruction.
        """
        if len(source) == 0:
            raise ConfigError("DestaRecipe: the source holds no clips")
        meta, waveform = source[index % len(source)]
        return self.prepare(index, meta, waveform)
