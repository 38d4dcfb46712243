"""Scoring multiple-choice audio benchmarks (MMAU, MMSU, MMAR) by their official rules.

    report = score("mmau", items)      # items: the benchmark's item dicts, each with the model's output
    report["accuracy"], report["by_task"]["sound"], report["items"][0]["match"]

**MMAU** (`Sakshi113/MMAU:evaluation.py`) and **MMAR** (`ddlBoJack/MMAR:code/evaluation.py`, which adopts
MMAU's rule) match the *text* of the answer (`string_match`):

- a text's tokens are the set of its maximal runs of word characters (Unicode letters, digits, `_`) after
  lower-casing: case and punctuation never matter, `dog-growling` is {dog, growling}, `44` is not `4`;
- the wrong-choice tokens are the tokens of every choice whose token set differs from the answer's, minus the
  answer's own tokens (words a wrong choice shares with the answer are allowed);
- a prediction matches iff it has at least one token, holds **every** answer token, and holds **no**
  wrong-choice token. So "The correct answer is: A woman" matches "A woman" (the extra words are in no
  choice), "woman" does not (the answer's "a" is missing), and "a woman, not an adult man" does not.

Items without the output key (MMAU `model_output`, MMAR `answer_prediction`) are skipped, not counted.
Accuracies are percentages over the scored items; MMAU groups by `task`, `difficulty`, `sub-category`;
MMAR by `modality` (reported as `by_task` and `by_modality`), `category`, `sub-category`.

**MMSU** (`dingdongwang/MMSU:mmsu_evaluation.py`) asks for a letter and reads one from `response`: the
stripped response (newlines removed) gives its first character if that is one of `A B C D`, else its second
to last character if that is one (for "The answer is B."); the item is correct iff that letter's
`choice_<x>` equals `answer_gt` exactly. A response that is empty or the string "None", or a missing
`response`, is scored wrong; a response with no letter in those places ("b", "sad", "The answer is B")
or one that is not a string is **skipped** (left out of the accuracy), as the official script does.
MMSU groups by `category` (`by_category`), by `category/sub-category` (`by_subcategory`, the official
joint key) and, beyond the official report, by `task_name` (`by_task`). `rule="string_match"` scores MMSU
items with MMAU's text rule over `choice_a..choice_d` instead (for free-text prompts such as DeSTA's).

Where the official scripts would crash this module decides instead: a `null` MMAU/MMAR output is scored
as an empty output (wrong), a non-string choice is compared as its `str` (a `null` choice is ignored),
groups are whatever values occur (the scripts only accept their fixed task / difficulty / modality names,
and also print 0% for fixed names with no items; here a group with no items is absent), and a file in
which no item has the output key at all raises `DataError` (the scripts divide by zero or report 0%).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from alm_jax.errors import ConfigError, DataError

BENCHMARKS = ("mmau", "mmsu", "mmar")
OUTPUT_KEYS = {"mmau": "model_output", "mmsu": "response", "mmar": "answer_prediction"}
RULES = ("official", "string_match")
MMSU_LETTERS = ("A", "B", "C", "D")
SKIP_NO_OUTPUT, SKIP_NOT_STRING, SKIP_WRONG_FORMAT = "no_output", "not_a_string", "wrong_format"

# report key -> item field (a tuple: fields joined by "/") per benchmark
_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "mmau": {"by_task": ("task",), "by_difficulty": ("difficulty",), "by_subcategory": ("sub-category",)},
    "mmar": {"by_task": ("modality",), "by_modality": ("modality",), "by_category": ("category",),
             "by_subcategory": ("sub-category",)},
    "mmsu": {"by_task": ("task_name",), "by_category": ("category",),
             "by_subcategory": ("category", "sub-category")},
}
_WORD = re.compile(r"\w+")


def tokens(text: str) -> frozenset[str]:
    """The lower-cased maximal word-character runs of `text` (MMAU's tokenization)."""
    return frozenset(_WORD.findall(text.lower()))


def string_match(answer: str, prediction: str, choices: Iterable[Any]) -> bool:
    """MMAU's rule: `prediction` holds every token of `answer` and no token that only a wrong choice has."""
    said = tokens(prediction)
    if not said:
        return False
    right = tokens(answer)
    wrong: set[str] = set()
    for choice in choices:
        if choice is None:
            continue
        t = tokens(str(choice))
        if t != right:
            wrong |= t - right
    return right <= said and not (said & wrong)


def mmsu_letter(response: Any) -> str | None:
    """The letter MMSU's script reads from a response: "A".."D", None (no prediction: scored wrong), or
    raises `_Skip` (the script leaves the item out)."""
    if not isinstance(response, str):
        raise _Skip(SKIP_NOT_STRING)
    text = response.strip().replace("\n", "")
    if not text or text == "None":
        return None
    if text[0] in MMSU_LETTERS:
        return text[0]
    if len(text) > 1 and text[-2] in MMSU_LETTERS:
        return text[-2]
    raise _Skip(SKIP_WRONG_FORMAT)


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def choices_of(benchmark: str, item: Mapping[str, Any]) -> list[Any]:
    """The item's options in order: `choices` (MMAU, MMAR) or the present `choice_a..choice_d` (MMSU)."""
    if benchmark == "mmsu":
        return [item[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d") if item.get(k) not in (None, "")]
    choices = item.get("choices")
    if not isinstance(choices, list):
        raise DataError(f"{benchmark} item {item.get('id', '?')!r} has no `choices` list")
    return choices


def answer_of(benchmark: str, item: Mapping[str, Any]) -> Any:
    """The item's correct answer text (`answer`, or MMSU's `answer_gt`)."""
    key = "answer_gt" if benchmark == "mmsu" else "answer"
    if key not in item:
        raise DataError(f"{benchmark} item {item.get('id', '?')!r} has no `{key}`; is this the {benchmark} layout?")
    return item[key]


def match_item(benchmark: str, item: Mapping[str, Any], *, key: str | None = None, rule: str = "official") -> int:
    """1 if the item's output is correct, 0 if not; raises `_Skip` for an item the rule leaves out."""
    key = key or OUTPUT_KEYS[benchmark]
    if benchmark == "mmsu" and rule == "official":
        letter = mmsu_letter(item.get(key, ""))
        if letter is None:
            return 0
        return int(item.get(f"choice_{letter.lower()}", "") == item.get("answer_gt", ""))
    if key not in item:
        raise _Skip(SKIP_NO_OUTPUT)
    output = item[key]
    output = "" if output is None else str(output)
    return int(string_match(str(answer_of(benchmark, item)), output, choices_of(benchmark, item)))


def score(benchmark: str, items: Sequence[Mapping[str, Any]], *, key: str | None = None,
          rule: str = "official") -> dict[str, Any]:
    """Scores `items` (dicts in the benchmark's published layout plus the model's output under `key`, default
    `OUTPUT_KEYS[benchmark]`) -> report:

    benchmark, rule, key; accuracy (percent of scored items matched); correct, scored (counts); skipped
    {reason: count}; by_task / by_difficulty / by_subcategory (+ by_category, by_modality where the benchmark
    has them) {group value: percent}; counts {report key: {group value: scored items}}; items: the scored
    items (copies) each with `match` 0/1, in input order.
    """
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {list(BENCHMARKS)}")
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; choose one of {list(RULES)}")
    key = key or OUTPUT_KEYS[benchmark]
    if items and not any(key in it for it in items):
        hint = (" (the MMAU README says `model_prediction`, but its evaluation.py reads `model_output`)"
                if benchmark == "mmau" else "")
        raise DataError(f"no {benchmark} item has the output key {key!r}{hint}; write the model's outputs under "
                        f"{key!r} or name the key you used (--key)")
    groups = _GROUPS[benchmark]
    hits: dict[str, Counter] = {g: Counter() for g in groups}
    seen: dict[str, Counter] = {g: Counter() for g in groups}
    skipped: Counter = Counter()
    scored: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"{benchmark} item {i} is a {type(item).__name__}, not an object")
        try:
            match = match_item(benchmark, item, key=key, rule=rule)
        except _Skip as s:
            skipped[s.reason] += 1
            continue
        scored.append({**item, "match": match})
        for g, fields in groups.items():
            value = _group_value(benchmark, item, fields)
            if value is not None:
                seen[g][value] += 1
                hits[g][value] += match
    if not scored:
        raise DataError(f"none of the {len(items)} {benchmark} items could be scored (skipped: {dict(skipped)}); "
                        f"check the output key {key!r} and the answer format")
    correct = sum(it["match"] for it in scored)
    report: dict[str, Any] = {
        "benchmark": benchmark, "rule": rule, "key": key, "accuracy": 100.0 * correct / len(scored),
        "correct": correct, "scored": len(scored), "skipped": dict(skipped),
        "by_task": {}, "by_difficulty": {}, "by_subcategory": {}}
    for g in groups:
        report[g] = {v: 100.0 * hits[g][v] / n for v, n in seen[g].items()}
    report["counts"] = {g: dict(seen[g]) for g in groups}
    report["items"] = scored
    return report


def _group_value(benchmark: str, item: Mapping[str, Any], fields: tuple[str, ...]) -> str | None:
    """The item's group under `fields` ("a/b" when joined); None when a field is absent (MMAU: an item without
    `sub-category` is in no sub-category; MMSU reads missing fields as "", as its script does)."""
    if benchmark == "mmsu":
        return "/".join(str(item.get(f, "")) for f in fields)
    values = [item.get(f) for f in fields]
    if any(v is None for v in values):
        return None
    return "/".join(str(v) for v in values)


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """The items of a benchmark or predictions file: a JSON list (MMAU), JSON lines (MMSU, MMAR), or the
    per-item details file `alm eval --suite mmau|mmsu|mmar --out DIR` writes (a JSON object whose `items`
    hold the answered items), so a suite's answers can be re-scored."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"items file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e}); expected a list of items or JSON lines") from None
    elif stripped.startswith("{") and _is_details_file(text):
        items = json.loads(text)["items"]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not a JSON object ({e}); expected one item per line") from None
    if not all(isinstance(it, dict) for it in items):
        raise DataError(f"{p}: every item must be a JSON object")
    return items


def details_settings(path: str | Path) -> dict[str, Any]:
    """The scoring settings (`rule`, `key`) a suite's details file records; {} for any other file."""
    text = Path(path).read_text(encoding="utf-8")
    if not (text.lstrip().startswith("{") and _is_details_file(text)):
        return {}
    whole = json.loads(text)
    return {k: whole[k] for k in ("rule", "key") if isinstance(whole.get(k), str)}


def _is_details_file(text: str) -> bool:
    """Whether `text` is one JSON object with an `items` list (a suite's details file), not JSON lines."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(whole, dict) and isinstance(whole.get("items"), list)


def summary_line(report: Mapping[str, Any]) -> str:
    """One line: overall accuracy and the first grouping, e.g. 'mmau: 61.20% of 1000 (sound 70.1, ...)'."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(report.get("by_task", {}).items()))
    skipped = sum(report.get("skipped", {}).values())
    return (f"{report['benchmark']}: {report['accuracy']:.2f}% of {report['scored']} scored"
            + (f" ({skipped} skipped)" if skipped else "") + (f"; by task: {parts}" if parts else ""))
