"""The BALSa recipe (LISTEN): positive, negative and combined prompts about one clip, so the ALM learns to
say which sounds are absent as well as which are present.

Generation prompt (BALSa's `[Begin of audio] seed [End of audio] P_gen`; the hints are ours and are
only in the generation prompt)::

    system: You are a helpful assistant.
    user:   [Begin of audio]
            [00:00-00:06] (Background: pink noise, SNR: 12.5 dB)
            [00:01-00:04] (Audio category: dog bark, Duration: 3s)
            [End of audio]
            Is there siren in this audio?

            Everything audible in the clip is listed above: a sound that is not listed is not in the clip.
            Sounds that are not in the clip include: siren.
            Begin your answer with "Yes" or "No", then explain briefly.
            Answer as someone who has listened to the audio: ...

Training messages: the DeSTA layout (`<start_audio><audio><end_audio>\\n{instruction}`), the LLM's answer as
the assistant turn.

Per item (draws keyed by `(seed, index)`): a prompt type with probability proportional to `positive`,
`negative`, `combined`; the yes/no form with probability `yes_no` (else open); a template from
`prompts/balsa.json` whose slots can be filled; labels for its slots. Positive items name labels of the
clip; negative items name **absent** labels: labels of the clip's `label_vocabulary` that are neither
among its labels nor co-occur with its context (see `alm_jax.recipes.cooccurrence`; the relation comes
from the source's mixing rules when it declares them, else from its clips' metadata). Combined items mix
present and absent labels; their yes/no form asks about two labels, one absent (answer no) or, half the
time when the clip has two labels, both present (answer yes). yes/no templates are shared by positive
and negative items so that the wording never gives the answer away. Fallbacks (recorded as
`metadata.fallback`): a negative or combined item for a clip with no absent label becomes positive; a
combined item for a clip with no label becomes negative; a yes/no item with nothing to ask about
becomes open.

Seed descriptions (`seed_format`): `desta` (timed lines, default), `caption`, `tags` (labels and
background), or `mixed` (one of the three per item). Record metadata: `item_index`, `prompt_type`,
`form`, `instruction`, `template_pool` and `template_index`, `present` and `absent` (labels named in the
instruction), `hint_absent` (absent labels named to the LLM only, in the hint), `expected` (`yes`/`no` for
yes/no items, else None), `seed_format`, `fallback` (or None), `transcripts` (with speech).
`finalize` drops a yes/no answer that does not begin with the expected Yes/No (`wrong_answer`, or
`no_yes_no` when it begins with neither); an answer that copies a hint is cut before the copy (`hint_echo`
when nothing is left). With `answer_hint` (off by default; ours, not the paper's) the
generation prompt of a yes/no item states the correct answer from the metadata (`The correct answer is "No":
begin your answer with "No", ...`) and the answer starts with it (`response_prefix` "No,"): the LLM writes
the explanation. A small backbone that answers "Yes" to almost every question from text (SmolLM2-135M) then
still yields "No" targets. The training prompt never carries the hint.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from alm_jax.data.metadata import ClipMeta
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, GenerationItem, Output, Recipe,
                                  Target, chat, check_fraction, check_weights, choose, clip_at, generation_audio,
                                  hint_head, join_words, require_seed, training_audio, transcripts_metadata)
from alm_jax.recipes.cooccurrence import NO_BACKGROUND, Cooccurrence
from alm_jax.recipes.pools import check_templates, json_pool, slots

RECIPE_ID = "balsa"
PROMPT_TYPES = ("positive", "negative", "combined")
SEED_FORMATS = ("desta", "caption", "tags")
COOCCURRENCE_MODES = ("auto", "source", "metadata", "none")
_STREAM = 0xBA15A
_LIST_SLOTS = {"labels_and", "labels_or"}
_CANDIDATE_SLOTS = {"candidates_and", "candidates_or"}
_PAIR_SLOTS = {"first", "second"}
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def _pools() -> dict[str, tuple[str, ...]]:
    pool = json_pool("balsa.json")
    every = {"label"} | _LIST_SLOTS | _CANDIDATE_SLOTS | _PAIR_SLOTS
    return {
        "positive_open": check_templates("balsa.json:positive_open", pool["positive_open"], {"label"}),
        "negative_open": check_templates("balsa.json:negative_open", pool["negative_open"], {"label"} | _LIST_SLOTS),
        "combined_open": check_templates("balsa.json:combined_open", pool["combined_open"], every - {"label"}),
        "yes_no": check_templates("balsa.json:yes_no", pool["yes_no"], {"label"}, {"label"}),
        "combined_yes_no": check_templates("balsa.json:combined_yes_no", pool["combined_yes_no"], _PAIR_SLOTS,
                                           _PAIR_SLOTS),
    }


def tags_seed_description(meta: ClipMeta) -> str:
    """`Sound labels: dog bark, bell. Background: pink noise.` ('' when the clip has neither)."""
    parts = []
    if meta.labels:
        parts.append(f"Sound labels: {', '.join(meta.labels)}.")
    background = meta.attributes.get("background")
    if background and str(background) not in NO_BACKGROUND:
        parts.append(f"Background: {background}.")
    return " ".join(parts)


def yes_no_answer(text: str) -> str | None:
    """'yes' / 'no' when `text` begins with that word (after punctuation or markup), else None."""
    match = _YES_NO.match(text)
    return match.group(1).lower() if match else None


BALSA_HINTS = ("complete", "absent", "yes_no", "yes_no_known", "listening")


class BalsaRecipe(Recipe):
    """BALSa single-clip prompts (see the module docstring).

    positive, negative, combined: relative weights of the prompt types (>= 0, not all 0); yes_no: the
    fraction of yes/no questions; seed_format: one of `desta`, `caption`, `tags`, `mixed`; max_absent:
    at most this many absent labels in one prompt; cooccurrence: `auto` (the source's rules if it declares
    them, else its metadata), `source`, `metadata`, `none`, or a ready `Cooccurrence`; cooccurrence_clips:
    how many clips of the source the metadata mode reads; min_cooccurrence: clips that must hold a pair;
    answer_hint: yes/no generation prompts state the metadata's answer (module docstring).
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, *, positive: float = 1.0, negative: float = 1.0, combined: float = 1.0,
                 yes_no: float = 0.5, seed_format: str = "desta", max_absent: int = 3,
                 cooccurrence: str | Cooccurrence = "auto", cooccurrence_clips: int = 1000,
                 min_cooccurrence: int = 1, answer_hint: bool = False):
        super().__init__(seed)
        self.weights = check_weights("BalsaRecipe", {"positive": positive, "negative": negative,
                                                     "combined": combined})
        self.yes_no = check_fraction("BalsaRecipe", "yes_no", yes_no)
        if seed_format not in SEED_FORMATS + ("mixed",):
            raise ConfigError(f"BalsaRecipe: seed_format must be one of {list(SEED_FORMATS) + ['mixed']}, "
                              f"got {seed_format!r}")
        if not isinstance(max_absent, int) or max_absent < 1:
            raise ConfigError(f"BalsaRecipe: max_absent must be an int >= 1, got {max_absent!r}")
        if not isinstance(cooccurrence, Cooccurrence) and cooccurrence not in COOCCURRENCE_MODES:
            raise ConfigError(f"BalsaRecipe: cooccurrence must be one of {list(COOCCURRENCE_MODES)} or a "
                              f"Cooccurrence, got {cooccurrence!r}")
        for name, value in (("cooccurrence_clips", cooccurrence_clips), ("min_cooccurrence", min_cooccurrence)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"BalsaRecipe: {name} must be an int >= 1, got {value!r}")
        self.seed_format, self.max_absent = seed_format, max_absent
        self.cooccurrence_mode, self.cooccurrence_clips = cooccurrence, cooccurrence_clips
        self.min_cooccurrence = min_cooccurrence
        if not isinstance(answer_hint, bool):
            raise ConfigError(f"BalsaRecipe: answer_hint must be true or false, got {answer_hint!r}")
        self.answer_hint = answer_hint
        self.pools = _pools()
        # the hints this recipe's generation prompts show (`generation_user`); balsa.json also holds DeSTA's
        # `labels` hint, which a BALSa answer cannot have copied
        self.hints = {k: v for k, v in json_pool("balsa.json")["hints"].items() if k in BALSA_HINTS}
        # each hint's opening words (up to its first slot), lowercased: what `cut_hint_echo` looks for
        self.hint_heads = [h for h in map(hint_head, self.hints.values()) if len(h) >= 12]
        self._table: tuple[object, Cooccurrence] | None = None

    # --- co-occurrence ----------------------------------------------------------------------------------

    def cooccurrence(self, source) -> Cooccurrence:
        """The co-occurrence relation used for `source` (built once per source object)."""
        if isinstance(self.cooccurrence_mode, Cooccurrence):
            return self.cooccurrence_mode
        if self._table is not None and self._table[0] is source:
            return self._table[1]
        mode = self.cooccurrence_mode
        if mode == "auto":
            mode = "source" if hasattr(source, "cooccurrence_pairs") else "metadata"
        if mode == "source":
            table = Cooccurrence.from_source(source)
        elif mode == "metadata":
            n = min(len(source), self.cooccurrence_clips)
            table = Cooccurrence.from_clips((source[i][0] for i in range(n)), self.min_cooccurrence)
        else:
            table = Cooccurrence()
        self._table = (source, table)
        return table

    # --- the draw ---------------------------------------------------------------------------------------

    def seed_description(self, meta: ClipMeta, rng: np.random.Generator) -> tuple[str, str]:
        """(format used, seed description); `caption`/`tags` fall back to `desta` when empty."""
        fmt = self.seed_format if self.seed_format != "mixed" else SEED_FORMATS[rng.integers(len(SEED_FORMATS))]
        text = {"desta": desta_seed_description, "caption": lambda m: m.caption or "",
                "tags": tags_seed_description}[fmt](meta)
        if not text.strip():
            fmt, text = "desta", desta_seed_description(meta)
        return fmt, require_seed(text, meta)

    def plan(self, index: int, meta: ClipMeta, absent: Sequence[str]) -> dict:
        """The prompt of item `index` for clip `meta` with absent labels `absent`: type, form, template,
        its fill, the labels named and the expected yes/no answer."""
        rng = self.rng(index, _STREAM)
        present = list(dict.fromkeys(meta.labels))
        kind = choose(rng, self.weights)
        form = "yes_no" if rng.random() < self.yes_no else "open"
        fallback = None
        if kind == "combined" and not present:
            kind, fallback = "negative", "no_present_label"
        if kind in ("negative", "combined") and not absent:
            kind, fallback = "positive", "no_absent_label"
        if form == "yes_no" and kind == "positive" and not present:
            form, fallback = "open", "no_present_label"

        def pick(names: Sequence[str], k: int) -> list[str]:
            return [names[j] for j in sorted(rng.choice(len(names), size=min(k, len(names)), replace=False))]

        named_present: list[str] = []
        named_absent: list[str] = []
        expected = None
        if form == "yes_no" and kind in ("positive", "negative"):
            pool_name = "yes_no"
            (named_present if kind == "positive" else named_absent).extend(pick(present if kind == "positive"
                                                                                else absent, 1))
            expected = "yes" if kind == "positive" else "no"
        elif form == "yes_no":
            pool_name = "combined_yes_no"
            if len(present) >= 2 and rng.random() < 0.5:
                named_present, expected = pick(present, 2), "yes"
            else:
                named_present, named_absent, expected = pick(present, 1), pick(absent, 1), "no"
        else:
            pool_name = f"{kind}_open"
        templates = self.pools[pool_name]
        usable = [k for k, t in enumerate(templates) if self._fillable(slots(t), kind, present, absent)]
        template_index = usable[rng.integers(len(usable))]
        template = templates[template_index]
        names = slots(template)
        if form == "open":
            if "label" in names:
                (named_present if kind == "positive" else named_absent).extend(
                    pick(present if kind == "positive" else absent, 1))
            elif names & _LIST_SLOTS:
                named_absent = pick(absent, int(rng.integers(1, min(self.max_absent, len(absent)) + 1)))
            elif names & (_CANDIDATE_SLOTS | _PAIR_SLOTS):
                n_absent = 1 if names & _PAIR_SLOTS else int(rng.integers(1, min(self.max_absent, len(absent)) + 1))
                n_present = 1 if names & _PAIR_SLOTS else int(rng.integers(1, min(self.max_absent, len(present)) + 1))
                named_present, named_absent = pick(present, n_present), pick(absent, n_absent)
        mixed = named_present + named_absent
        mixed = [mixed[j] for j in rng.permutation(len(mixed))]
        fill = {"label": (named_present or named_absent or [""])[0],
                "labels_and": join_words(named_absent, "and"), "labels_or": join_words(named_absent, "or"),
                "candidates_and": join_words(mixed, "and"), "candidates_or": join_words(mixed, "or"),
                "first": mixed[0] if mixed else "", "second": mixed[1] if len(mixed) > 1 else ""}
        instruction = template.format(**{k: fill[k] for k in names})
        hint_absent = named_absent
        if kind != "positive" and not hint_absent:  # open templates without slots: show some absent labels
            hint_absent = pick(absent, self.max_absent)
        return {"prompt_type": kind, "form": form, "instruction": instruction, "template_pool": pool_name,
                "template_index": template_index, "present": named_present, "absent": named_absent,
                "hint_absent": hint_absent, "expected": expected, "fallback": fallback}

    @staticmethod
    def _fillable(names: set[str], kind: str, present: Sequence[str], absent: Sequence[str]) -> bool:
        if kind == "positive":
            return "label" not in names or bool(present)
        if kind == "negative":
            return bool(absent)
        return bool(present) and bool(absent)

    def generation_user(self, seed_description: str, plan: dict) -> str:
        """The generation prompt's user turn: audio as text, the instruction, then the hints."""
        hints = []
        if plan["prompt_type"] != "positive" or plan["absent"]:
            hints.append(self.hints["complete"])
        if plan["hint_absent"]:
            hints.append(self.hints["absent"].format(labels=join_words(plan["hint_absent"], "and")))
        if plan["expected"] is not None and self.answer_hint:
            hints.append(self.hints["yes_no_known"].format(answer=plan["expected"].capitalize()))
        elif plan["expected"] is not None:
            hints.append(self.hints["yes_no"])
        hints.append(self.hints["listening"])
        return f"{generation_audio([seed_description])}\n{plan['instruction']}\n\n" + "\n".join(hints)

    def item_for(self, index: int, source) -> GenerationItem:
        """Item `index`: clip `index % len(source)` with a drawn BALSa prompt (see the module docstring)."""
        meta, waveform = clip_at(source, index)
        absent = self.cooccurrence(source).absent_labels(meta)
        plan = self.plan(index, meta, absent)
        seed_format, seed_description = self.seed_description(meta, self.rng(index, _STREAM + 1))
        metadata = {"item_index": int(index), "seed_format": seed_format,
                    **{k: plan[k] for k in ("prompt_type", "form", "instruction", "template_pool", "template_index",
                                            "present", "absent", "hint_absent", "expected", "fallback")},
                    **transcripts_metadata([meta])}
        return GenerationItem(
            generation_messages=chat(GENERATION_SYSTEM_PROMPT, self.generation_user(seed_description, plan)),
            record_messages=chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{plan['instruction']}"),
            clips=[(meta, waveform)], seed_descriptions=[seed_description], recipe=self.recipe_id,
            source=meta.source, item_id=meta.clip_id, seed=self.seed, metadata=metadata,
            response_prefix=f"{plan['expected'].capitalize()}," if self.answer_hint and plan["expected"] else None)

    def cut_hint_echo(self, text: str) -> str:
        """`text` cut before the first copy of a hint's opening words (the hints are generation-only) that
        is not at its start; a text that starts with a copy keeps that first sentence only. Stripped."""
        low, heads = text.lower(), self.hint_heads
        cut = len(text)
        for head in heads:
            at = low.find(head, 1)
            if at >= 0:
                cut = min(cut, at)
        if any(low.startswith(h) for h in heads):
            end = re.search(r"[.!?\n]", text)
            cut = min(cut, end.end() if end else cut)
        return text[:cut].strip()

    def finalize(self, item: GenerationItem, outputs: Sequence[Output],
                 count_tokens: Callable[[str], int] | None = None) -> Target:
        """The answer as target, cut before any copy of a generation hint (`hint_echo` when nothing is left),
        unless it echoes the seed markup or gets a yes/no question wrong."""
        text = self.cut_hint_echo(outputs[-1].text)
        if not text:
            return Target.drop("hint_echo")
        if not self.accepts(text):
            return Target.drop("rejected_by_recipe")
        expected = item.metadata.get("expected")
        if expected is not None:
            answer = yes_no_answer(text)
            if answer is None:
                return Target.drop("no_yes_no")
            if answer != expected:
                return Target.drop("wrong_answer")
        return Target.keep(text)

