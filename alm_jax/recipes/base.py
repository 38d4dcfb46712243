"""What every recipe shares: the `GenerationItem` it hands the engine, the `Target` verdict of its
post-processing, the chat layout of one or several clips, and item-keyed random draws.

A recipe turns corpus position `index` into a `GenerationItem` (`item_for(index, source)`); the engine has
the backbone LLM answer `item.generation_messages` and writes `item.to_record(answer, ...)`. The protocol,
including the optional extensions (skipped items, answers from metadata, a second LLM pass), is written
out in `alm_jax/recipes/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from alm_jax.data.bad_data import data_error
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Provenance, Record
from alm_jax.errors import ConfigError

GENERATION_SYSTEM_PROMPT = "You are a helpful assistant."
TRAINING_SYSTEM_PROMPT = ("You are a helpful assistant. The audio clips appear between <start_audio> and "
                          "<end_audio> tags.")
BEGIN_AUDIO, END_AUDIO = "[Begin of audio]", "[End of audio]"
START_AUDIO_TAG, END_AUDIO_TAG = "<start_audio>", "<end_audio>"
# Provenance `generator` of a record whose answer was written from metadata, not by an LLM.
METADATA_GENERATOR = "metadata"
# A copied seed line (`[00:01-00:03] (Audio category: ...`) or an audio marker (`[Begin of audio 2]`).
_ECHO = re.compile(r"\[(?:begin|end) of audio(?: \d+)?\]|\[\d{2,}:\d{2}-\d{2,}:\d{2}\]\s*\(", re.IGNORECASE)


@dataclasses.dataclass
class GenerationItem:
    """What a recipe makes of one corpus item before the LLM answers: prompt, clips, record template.

    `generation_messages`: the chat the backbone LLM continues (system + user, audio as text);
    `record_messages`: the training chat without its final assistant turn; `clips`: (meta, waveform
    float32 `[samples]`) per `AUDIO_PLACEHOLDER`, in order (empty for a text-only record);
    `metadata` goes into the record as is.

    Optional, for the engine (see `alm_jax.recipes` for the protocol):
    `skip_reason`: set when the recipe filtered the item before generation (e.g. `clip_too_long`): the
    engine generates nothing and counts it as filtered under that reason.
    `fixed_response`: the answer, known from metadata (closed-form questions, captions): the engine asks
    no LLM and writes it as the assistant turn; the record's provenance generator is then `"metadata"`.
    `generation_messages` is still a valid prompt, so an engine that ignores this field can answer it.
    `response_prefix`: the start of the LLM's answer, fixed (e.g. `No,` when the answer is known from
    metadata): the engine appends it after the assistant header, the LLM continues it, and the target is
    `prefix + " " + continuation`.
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
    skip_reason: str | None = None
    fixed_response: str | None = None
    response_prefix: str | None = None

    def to_record(self, response: str, generator: str, audio_format: str = "flac",
                  extra_metadata: dict[str, Any] | None = None) -> Record:
        """The training `Record`: clips encoded as `audio_format`, `response` as the assistant turn.

        With a `fixed_response` the provenance generator is `"metadata"` whatever `generator` says.
        """
        if self.fixed_response is not None:
            generator = METADATA_GENERATOR
        clips = [AudioClip.from_wave(wave, meta.sample_rate, audio_format, meta=meta) for meta, wave in self.clips]
        return Record(
            clips=clips,
            messages=[*self.record_messages, {"role": "assistant", "content": response}],
            seed_descriptions=list(self.seed_descriptions), recipe=self.recipe,
            provenance=Provenance(source=self.source, item_id=self.item_id, generator=generator, seed=self.seed),
            metadata={**self.metadata, **(extra_metadata or {})})


class Output(Protocol):
    """One LLM answer as the engine reports it (`generation.engine.Response` has these fields)."""
    text: str
    n_tokens: int
    finished: bool


@dataclasses.dataclass(frozen=True)
class StagePrompt:
    """The prompt of a later LLM pass (stage >= 1) of a multi-stage recipe.

    `messages`: the chat to continue; `max_new_tokens`: a per-stage cap (None: the engine's setting);
    `thinking_budget`: for reasoning models, tokens allowed inside `<think>` before the engine appends
    `budget_message` and lets the model continue (None: no budget forcing); `assistant_prefix`: text the
    assistant turn is made to start with (appended to the templated prompt; the stage's output text then
    begins with it), e.g. an answer tag a small backbone would not open by itself.
    """
    messages: list[dict[str, str]]
    max_new_tokens: int | None = None
    thinking_budget: int | None = None
    budget_message: str = ""
    assistant_prefix: str = ""


@dataclasses.dataclass(frozen=True)
class Target:
    """A recipe's verdict on an item's LLM output(s): the training target, or why there is none.

    `text`: the assistant turn to record (None: drop the item); `reason`: why it was dropped (the
    engine's `filtered` counter key); `metadata`: extra record metadata (merged after the engine's).
    """
    text: str | None
    reason: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def keep(cls, text: str, **metadata: Any) -> "Target":
        return cls(text, None, metadata)

    @classmethod
    def drop(cls, reason: str, **metadata: Any) -> "Target":
        return cls(None, reason, metadata)

    @property
    def kept(self) -> bool:
        return self.text is not None


def echoes_seed(text: str) -> bool:
    """True when `text` copies seed-description markup (an audio marker or a `[mm:ss-mm:ss] (` line)."""
    return _ECHO.search(text) is not None


def hint_head(hint: str) -> str:
    """A generation hint's opening words (up to 4, before its first `{slot}`), lowercased: what the recipes look
    for in an answer to tell that it copied the hint (the hints are generation-only text)."""
    return " ".join(hint.split()[:4]).split("{")[0].strip().lower()


def read_label(text: str, labels: Sequence[str], nouns: Mapping[str, str] | None = None) -> str | None:
    """The label `text` names first (case-insensitive whole words, each word may take a suffix, words joined
    by spaces or hyphens; the longer label wins a tie), or None. `nouns` ({noun: label}) also read a label from
    its noun alone ("a clock", "a barking dog"), in the plural too ("birds") but never inside a longer word
    ("waterfall"); a label named in full at the same place wins."""
    low = text.lower()
    best: tuple[int, int, str] | None = None
    patterns = [(label, r"[\s-]+".join(re.escape(w) + r"[a-z]*" for w in label.lower().split()), len(label))
                for label in labels]
    patterns += [(label, re.escape(noun.lower()) + r"(?:e?s)?", 0) for noun, label in (nouns or {}).items()
                 if label in labels]
    for label, pattern, length in patterns:
        m = re.search(r"(?<![a-z])" + pattern + r"(?![a-z])", low)
        if m and (best is None or (m.start(), -length) < best[:2]):
            best = (m.start(), -length, label)
    return best[2] if best else None


class Recipe:
    """Base of the recipes: seed checks, item-keyed RNGs, the default single-stage post-processing.

    A subclass sets `recipe_id` and implements `item_for(index, source) -> GenerationItem`. Draws for item
    `index` come from `self.rng(index, stream)`, which depends on `(seed, stream, index)` only, so any item
    can be rebuilt alone and in any order.
    """
    recipe_id = "recipe"
    n_stages = 1

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"{type(self).__name__}: seed must be an int >= 0, got {seed!r}")
        self.seed = int(seed)

    def rng(self, index: int, stream: int) -> np.random.Generator:
        """The generator of item `index` for one purpose (`stream`, a recipe-chosen constant)."""
        return np.random.default_rng([self.seed, int(stream), int(index)])

    def item_for(self, index: int, source) -> GenerationItem:  # pragma: no cover - abstract
        raise NotImplementedError

    def accepts(self, response: str) -> bool:
        """False for a first-stage answer that echoes the seed description's markup instead of answering
        (small backbones often do; such a target teaches the ALM to read metadata aloud)."""
        return not echoes_seed(response)

    def finalize(self, item: GenerationItem, outputs: Sequence[Output],
                 count_tokens: Callable[[str], int] | None = None) -> Target:
        """The training target of `item` from its LLM outputs (one per stage): by default the last
        answer, kept if `accepts` it."""
        text = outputs[-1].text
        return Target.keep(text) if self.accepts(text) else Target.drop("rejected_by_recipe")

    def stage_prompt(self, item: GenerationItem, stage: int, outputs: Sequence[Output]) -> StagePrompt:
        raise ConfigError(f"{type(self).__name__} has {self.n_stages} stage(s); there is no stage {stage}")


# ---------------------------------------------------------------------------------------------------------
# Chat layout


def chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def generation_audio(seed_descriptions: Sequence[str]) -> str:
    """The audio of a generation prompt as text: one clip between `[Begin of audio]` / `[End of audio]`,
    several as `[Begin of audio 1]` ... `[End of audio 1]`, `[Begin of audio 2]` ..."""
    if len(seed_descriptions) == 1:
        return f"{BEGIN_AUDIO}\n{seed_descriptions[0]}\n{END_AUDIO}"
    return "\n".join(f"{BEGIN_AUDIO[:-1]} {k}]\n{seed}\n{END_AUDIO[:-1]} {k}]"
                     for k, seed in enumerate(seed_descriptions, 1))


def training_audio(n_clips: int, placeholder: str = AUDIO_PLACEHOLDER) -> str:
    """The audio of a training prompt: `<start_audio><audio><end_audio>` per clip; several clips are
    labelled `Audio 1: ...`, one per line."""
    span = f"{START_AUDIO_TAG}{placeholder}{END_AUDIO_TAG}"
    if n_clips == 1:
        return span
    return "\n".join(f"Audio {k}: {span}" for k in range(1, n_clips + 1))


def transcripts_metadata(metas: Sequence[ClipMeta]) -> dict[str, list[str]]:
    """`{"transcripts": [one per clip, '' without speech]}` when any clip has speech, else `{}`.

    The transcript is what DeSTA appends as text tokens after a clip's audio tokens (cut to 100 tokens
    at training time, by the pipeline); absence means no clip has speech (DeSTA then uses a single space).
    """
    transcripts = [meta.transcript for meta in metas]
    return {"transcripts": transcripts} if any(transcripts) else {}


def require_seed(description: str, meta: ClipMeta) -> str:
    """`description`, or `DataError` (kind `empty_seed_description`) when nothing is known about the clip."""
    if not description.strip():
        raise data_error("empty_seed_description", f"clip {meta.clip_id!r} ({meta.source}) has no caption, "
                                                   "labels, events, speech or background to describe")
    return description


def clip_at(source, index: int) -> tuple[ClipMeta, np.ndarray]:
    """Clip `index % len(source)` of a `source[i] -> (meta, waveform)`; ConfigError for an empty source."""
    if len(source) == 0:
        raise ConfigError("the source holds no clips; give the recipe a source with at least one clip")
    return source[index % len(source)]


def choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of `weights` (non-negative, positive sum), drawn with probability proportional to its weight."""
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def check_weights(owner: str, weights: dict[str, float]) -> dict[str, float]:
    """`weights` as floats after checking they are finite, >= 0 and not all zero (ConfigError otherwise)."""
    out = {}
    for key, value in weights.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{owner}: {key} must be a number >= 0, got {value!r}") from None
        if not np.isfinite(value) or value < 0:
            raise ConfigError(f"{owner}: {key} must be a finite number >= 0, got {value!r}")
        out[key] = value
    if sum(out.values()) <= 0:
        raise ConfigError(f"{owner}: at least one of {sorted(out)} must be > 0")
    return out


def check_fraction(owner: str, name: str, value: float) -> float:
    """`value` as a float in [0, 1] (ConfigError otherwise)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{owner}: {name} must be in [0, 1], got {value!r}")
    return value


def join_words(items: Sequence[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c' (or with 'or')."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"
