"""Prompt pools as package data: `alm_jax/recipes/prompts/*.txt` (one prompt a line) and `*.json`.

Text pools: one prompt per line; blank lines and lines starting with `#` are skipped; order is kept
(recipes draw by index, so new prompts go at the end to keep existing corpora reproducible).
JSON pools hold templates with named `{slots}` and fixed texts (system prompts, few-shot pairs).
Both are written for this project; no published prompt text is copied.
"""

from __future__ import annotations

import functools
import json
import string
from importlib import resources
from typing import Any, Iterable

from alm_jax.errors import ConfigError

PROMPTS_PACKAGE = "alm_jax.recipes"
PROMPTS_DIR = "prompts"


def _read(name: str) -> str:
    path = resources.files(PROMPTS_PACKAGE).joinpath(PROMPTS_DIR, name)
    if not path.is_file():
        raise ConfigError(f"prompt pool {PROMPTS_DIR}/{name} is missing from alm_jax.recipes; reinstall the "
                          "package (`pip install -e .`) so its data files are present")
    return path.read_text(encoding="utf-8")


def prompt_lines(text: str) -> tuple[str, ...]:
    """The entries of a text pool's contents: one a line, stripped; blank lines and `#` lines skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


@functools.cache
def text_pool(name: str) -> tuple[str, ...]:
    """The prompts of `prompts/<name>` (a .txt file), in file order; ConfigError on duplicates or none."""
    prompts = prompt_lines(_read(name))
    if not prompts:
        raise ConfigError(f"prompt pool {PROMPTS_DIR}/{name} holds no prompts")
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:
        raise ConfigError(f"prompt pool {PROMPTS_DIR}/{name} repeats {duplicates[:3]}; remove the copies")
    return prompts


@functools.cache
def json_pool(name: str) -> Any:
    """The parsed `prompts/<name>` (a .json file). Callers must not modify it (it is cached)."""
    try:
        return json.loads(_read(name))
    except json.JSONDecodeError as e:
        raise ConfigError(f"prompt pool {PROMPTS_DIR}/{name} is not valid JSON: {e}") from None


def slots(template: str) -> set[str]:
    """The `{slot}` names of a format template."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def check_templates(pool_name: str, templates: Iterable[str], allowed: set[str], required: set[str] = frozenset()
                    ) -> tuple[str, ...]:
    """`templates` as a tuple after checking each uses only `allowed` slots and all `required` ones."""
    out = tuple(templates)
    if not out:
        raise ConfigError(f"prompt pool {pool_name} is empty")
    for t in out:
        names = slots(t)
        if not names <= allowed or not required <= names:
            raise ConfigError(f"prompt pool {pool_name}: template {t!r} uses slots {sorted(names)}; allowed "
                              f"{sorted(allowed)}, required {sorted(required)}")
    return out
