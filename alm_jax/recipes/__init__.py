"""Recipes: how each method turns source clips into prompts for the backbone LLM and into training records.

    recipe = build_recipe("balsa", seed=0, negative="2", yes_no="0.3")   # `alm generate --recipe balsa k=v`
    item = recipe.item_for(17, source)                                     # a GenerationItem

| name | module | what an item is |
|---|---|---|
| `desta` | `desta.py` | one clip + a DeSTA instruction (225-instruction pool) |
| `balsa` | `balsa.py` | one clip + a positive / negative / combined prompt, open or yes/no |
| `balsa_ma` | `balsa_ma.py` | 2-3 clips + "explain the differences" or "one caption for all" |
| `alarm` | `alarm.py` | one clip + a prompt, answered, then self-rephrased (2 LLM passes) |
| `mallm` | `mallm.py` | a near-identical pair (`source.pair(i)`): difference description or closed-form question |
| `mats` | `mats.py` | text only: a caption / description + instruction, no audio bytes |

Prompt pools are data files in `recipes/prompts/` (see `pools.py`), written for this project.

**The protocol the engine uses** (base class `base.Recipe`):

1. `recipe.item_for(index, source) -> GenerationItem` for corpus position `index`; depends only on
   `(recipe seed and options, index, source)`. May raise `DataError` / `AudioError` (a bad item).
   `source[i] -> (ClipMeta, waveform)` with `len`; `mallm` also needs `source.pair(i) -> ClipPair`.
2. `item.skip_reason` (str or None): when set, generate nothing; count the item as filtered under it.
3. `item.fixed_response` (str or None): when set, the answer comes from metadata: ask no LLM, write
   `item.to_record(item.fixed_response, ...)` (its provenance generator becomes `"metadata"`).
4. Otherwise the LLM answers `item.generation_messages` (stage 0); `recipe.accepts(text)` may reject
   that answer (as today).
5. `recipe.n_stages` (1 unless said): for `stage` in `1 .. n_stages - 1`, `recipe.stage_prompt(item,
   stage, outputs) -> StagePrompt` (outputs so far, each with `.text`, `.n_tokens`, `.finished`, e.g. the
   engine's `Response`); the engine answers `StagePrompt.messages`, capped at `max_new_tokens` if set,
   and, when `thinking_budget` is set, generates at most that many tokens first and, if they ran out,
   appends `alarm.budget_continuation(text, budget_message)` to the prompt + partial answer and
   generates on (ALARM's budget forcing). Only `alarm` has 2 stages.
6. `recipe.finalize(item, outputs, count_tokens) -> Target`: the target text (`Target.text`, with
   `Target.metadata` merged into the record's) or a drop reason (`Target.reason`, count as filtered).
   `count_tokens(text) -> int` counts backbone tokens (needed by `alarm`'s length filter). For a
   single-stage recipe it checks item-dependent things (BALSa: the yes/no answer matches the metadata).
7. Record: `item.to_record(target, generator_name, audio_format, {engine metadata, **Target.metadata})`.
   Records may hold several clips (`balsa_ma`, `mallm`: one `<audio>` per clip, in order) or none
   (`mats`: `<audio_text>` placeholders, the texts in `metadata["audio_texts"]`).

Record metadata common to the audio recipes: `item_index`, and `transcripts` (one per clip, '' without
speech; present only when a clip has speech): the text DeSTA appends as tokens after a clip's audio.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from alm_jax.errors import ConfigError
from alm_jax.recipes.alarm import AlarmRecipe
from alm_jax.recipes.balsa import BalsaRecipe
from alm_jax.recipes.balsa_ma import BalsaMaRecipe
from alm_jax.recipes.base import GenerationItem, Recipe, StagePrompt, Target
from alm_jax.recipes.desta import DestaRecipe
from alm_jax.recipes.mallm import MallmRecipe
from alm_jax.recipes.mats import MatsRecipe
from alm_jax.recipes.pools import prompt_lines

RECIPES: dict[str, type[Recipe]] = {
    "desta": DestaRecipe,
    "balsa": BalsaRecipe,
    "balsa_ma": BalsaMaRecipe,
    "alarm": AlarmRecipe,
    "mallm": MallmRecipe,
    "mats": MatsRecipe,
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def recipe_options(name: str) -> dict[str, Any]:
    """The options of recipe `name` (besides `seed`) and their defaults."""
    cls = _recipe_class(name)
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "seed") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build_recipe(name: str, seed: int | str = 0, **options: Any) -> Recipe:
    """`RECIPES[name](seed, **options)`; string values (from `key=value` on a command line) are converted
    to the type of the option's default (int, float, bool as true/false/1/0/yes/no, str; a list option takes a
    YAML list or the path of a file with one entry a line).

    Raises ConfigError for an unknown recipe or option, or a value of the wrong type.
    """
    cls = _recipe_class(name)
    known = recipe_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"recipe {name!r} has no option(s) {unknown}; its options are "
                          + ", ".join(f"{k}={v!r}" for k, v in known.items()))
    converted = {key: _convert(name, key, value, known[key]) for key, value in options.items()}
    return cls(_convert(name, "seed", seed, 0), **converted)


def _text_list(recipe: str, key: str, text: str) -> tuple[str, ...]:
    """A list option given as text: a YAML list (`[a, "b?"]`) or the path of a file with one entry a line
    (blank lines and lines starting with '#' skipped, like `prompts/desta_instructions.txt`)."""
    if text.startswith("["):
        import yaml
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {recipe!r}: option {key}={text!r} is not a YAML list ({e})") from None
    elif Path(text).is_file():
        items = list(prompt_lines(Path(text).read_text(encoding="utf-8")))
    else:
        raise ConfigError(f"recipe {recipe!r}: option {key}={text!r} must be a YAML list like [a, b] or the path "
                          "of a text file with one entry a line")
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise ConfigError(f"recipe {recipe!r}: option {key} must list at least one non-empty string, got {items!r}")
    return tuple(items)


def _recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def _convert(recipe: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    text = value.strip()
    if isinstance(default, (tuple, list)):
        return _text_list(recipe, key, text)
    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"recipe {recipe!r}: option {key}={value!r} must be a {type(default).__name__} "
                          f"(default {default!r})") from None
    if default is None or inspect.isclass(default):
        raise ConfigError(f"recipe {recipe!r}: option {key} cannot be given as text; pass it from Python")
    return value


__all__ = ["RECIPES", "AlarmRecipe", "BalsaMaRecipe", "BalsaRecipe", "DestaRecipe", "GenerationItem", "MallmRecipe",
           "MatsRecipe", "Recipe", "StagePrompt", "Target", "build_recipe", "recipe_options"]
