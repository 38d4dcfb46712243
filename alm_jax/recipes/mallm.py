"""The MALLM recipe: discriminative training on pairs of near-identical clips.

A pair comes from the source's pair generator (`source.pair(i) -> ClipPair`, e.g. `DemoSource.pair`): the
same background with one event added, removed or replaced, or the same sentence with one word changed.
With `pair_edits` including `level` / `length` the two clips differ in loudness or duration instead. Two kinds
of item:

- **difference** (open): the backbone LLM reads both seed descriptions, labelled `[Begin of audio 1]` ...,
  and writes what differs (generation prompt: the instruction, then the hints "The two clips are identical
  except for one change." and how to refer to the clips);
- **closed-form** (no LLM): "Which clip contains {label}?" (or "Is {label} in Audio 1 or in Audio 2?", the
  clips named as the training layout labels them), "In which clip does the speaker say "{word}"?" (or "... in
  Audio 1 or in Audio 2?"), "Which sound / word differs?", "Which clip (Audio 1 or 2) is louder / longer?",
  answered from the two clips' rendered metadata: the labels (or transcript words) that one clip has and the
  other lacks, their `level_db` attributes, their durations. `item.fixed_response` holds the answer;
  `generation_messages` is still a valid prompt for an engine that ignores it.

Training messages: `Audio 1: <start_audio><audio><end_audio>` / `Audio 2: ...` then the instruction.
Item `index` (draws keyed by `(seed, index)`) uses pair `index % len(source)`; its clip order is swapped
with probability 1/2 (`swap_order`), so the edited clip is first or second alike; it is closed-form with
probability `closed`, and then the question kind is uniform over those the edit allows. Record metadata:
`item_index`, `pair_index`, `edit`, `task`, `instruction`, `swapped`, `answer` (closed-form answer or
None), `answer_clip` (1 or 2 for which-clip questions, else None), `transcripts` (with speech).
"""

from __future__ import annotations

import re

from alm_jax.data.bad_data import data_error
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, GenerationItem, Recipe, chat,
                                  check_fraction, generation_audio, require_seed, training_audio,
                                  transcripts_metadata)
from alm_jax.recipes.pools import check_templates, json_pool

RECIPE_ID = "mallm"
ORDINALS = ("first", "second")
_STREAM = 0x3A11
_WORD = re.compile(r"[A-Za-z']+")
_CLOSED_SLOTS = {"label", "word", "before", "after", "ordinal", "other", "number"}
# closed-form tasks by what the pair differs in; the two-sided ones name the first clip's item and the second's
_SOUND_TASKS = ("which_has_sound", "which_audio_has_sound")
_WORD_TASKS = ("which_says", "which_audio_says", "what_differs_word")
_TWO_SIDED = ("what_differs_replace", "what_differs_word")
# pairs that differ in level or duration (`DemoSource` `level` / `length` edits): which clip is louder / longer
_LOUD_TASKS = ("which_louder", "which_audio_louder")
_LONG_TASKS = ("which_longer", "which_audio_longer")


def transcript_words(meta: ClipMeta) -> list[str]:
    """The words of a clip's transcript, in order."""
    return _WORD.findall(meta.transcript)


def differences(metas: tuple[ClipMeta, ClipMeta]) -> tuple[list[list[str]], list[list[str]]]:
    """(labels, transcript words) each clip has and the other lacks: `[[only in 1st], [only in 2nd]]`."""
    labels = [[x for x in dict.fromkeys(m.labels) if x not in o.labels] for m, o in (metas, metas[::-1])]
    words = [transcript_words(m) for m in metas]
    word_diff = [[w for w in dict.fromkeys(words[k]) if w not in words[1 - k]] for k in (0, 1)]
    return labels, word_diff


class MallmRecipe(Recipe):
    """MALLM near-identical pairs (see the module docstring).

    closed: the fraction of closed-form items (answers from metadata, no LLM); swap_order: randomize which
    clip of a pair comes first.
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, *, closed: float = 0.5, swap_order: bool = True):
        super().__init__(seed)
        self.closed = check_fraction("MallmRecipe", "closed", closed)
        self.swap_order = bool(swap_order)
        pool = json_pool("mallm.json")
        self.difference = check_templates("mallm.json:difference", pool["difference"], set())
        self.questions = {name: (check_templates(f"mallm.json:closed.{name}", spec["questions"], _CLOSED_SLOTS),
                                 spec["answer"]) for name, spec in pool["closed"].items()}
        self.hints = dict(pool["hints"])

    def closed_item(self, metas: tuple[ClipMeta, ClipMeta], rng) -> dict:
        """A closed-form question about two clips and its answer, both from their metadata."""
        labels, words = differences(metas)
        levels = [m.attributes.get("level_db") for m in metas]
        if not (any(labels) or any(words)):   # the same content: louder or longer, when they differ in that
            if None not in levels and levels[0] != levels[1]:
                return self._which_item(_LOUD_TASKS, int(levels[1] > levels[0]), rng)
            if metas[0].duration != metas[1].duration:
                return self._which_item(_LONG_TASKS, int(metas[1].duration > metas[0].duration), rng)
        options = []
        if labels[0] or labels[1]:
            options += list(_SOUND_TASKS)
            options.append("what_differs_replace" if labels[0] and labels[1] else "what_differs_add")
        elif words[0] or words[1]:
            options += list(_WORD_TASKS)
        else:
            raise data_error("pair_without_difference", f"clips {metas[0].clip_id} and {metas[1].clip_id} have the "
                                                        "same labels, transcript, level and duration; a pair must "
                                                        "differ in one")
        task = options[rng.integers(len(options))]
        diff = words if task in _WORD_TASKS else labels
        if task not in _TWO_SIDED:
            sides = [k for k in (0, 1) if diff[k]]
            k = sides[rng.integers(len(sides))]
            item = diff[k][rng.integers(len(diff[k]))]
            fill = {"label": item, "word": item, "ordinal": ORDINALS[k], "other": ORDINALS[1 - k], "number": k + 1}
            answer_clip = k + 1 if task != "what_differs_add" else None
        else:  # the first clip's item and the second's
            fill = {"before": diff[0][0], "after": diff[1][0], "ordinal": ORDINALS[0], "other": ORDINALS[1]}
            answer_clip = None
        questions, answer = self.questions[task]
        question = questions[rng.integers(len(questions))]
        return {"task": task, "instruction": question.format(**fill), "answer": answer.format(**fill),
                "answer_clip": answer_clip}

    def _which_item(self, tasks: tuple[str, ...], k: int, rng) -> dict:
        """A louder / longer question whose answer is clip `k` (0 or 1)."""
        task = tasks[rng.integers(len(tasks))]
        questions, answer = self.questions[task]
        fill = {"ordinal": ORDINALS[k], "other": ORDINALS[1 - k], "number": k + 1}
        return {"task": task, "instruction": questions[rng.integers(len(questions))].format(**fill),
                "answer": answer.format(**fill), "answer_clip": k + 1}

    def item_for(self, index: int, source) -> GenerationItem:
        """Item `index`: pair `index % len(source)`, an open difference item or a closed-form question."""
        if getattr(source, "pair", None) is None:
            raise ConfigError(f"MallmRecipe needs a source with pair(index) -> ClipPair (e.g. DemoSource); "
                              f"{type(source).__name__} has none")
        if len(source) == 0:
            raise ConfigError("MallmRecipe: the source is empty; give it n_clips >= 1 (the number of pairs used)")
        pair_index = index % len(source)
        pair = source.pair(pair_index)
        rng = self.rng(index, _STREAM)
        swapped = self.swap_order and bool(rng.random() < 0.5)
        clips = [pair.second, pair.first] if swapped else [pair.first, pair.second]
        metas = (clips[0][0], clips[1][0])
        seeds = [require_seed(desta_seed_description(meta), meta) for meta in metas]
        if rng.random() < self.closed:
            closed = self.closed_item(metas, rng)
        else:
            closed = {"task": "difference", "instruction": self.difference[rng.integers(len(self.difference))],
                      "answer": None, "answer_clip": None}
        user = (f"{generation_audio(seeds)}\n{closed['instruction']}\n\n"
                f"{self.hints['one_change']}\n{self.hints['listening']}")
        return GenerationItem(
            generation_messages=chat(GENERATION_SYSTEM_PROMPT, user),
            record_messages=chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(2)}\n{closed['instruction']}"),
            clips=clips, seed_descriptions=seeds, recipe=self.recipe_id, source=metas[0].source,
            item_id=f"{metas[0].clip_id}+{metas[1].clip_id}", seed=self.seed, fixed_response=closed["answer"],
            metadata={"item_index": int(index), "pair_index": pair_index, "edit": pair.edit, "swapped": swapped,
                      **closed, **transcripts_metadata(metas)})
