"""Forgetting: does the ALM still answer text like its frozen backbone? (Speech-IFEval's question, text only.)

    suite = ForgettingSuite.build(cfg, SuiteConfig(name="forgetting"))
    suite.run(model)   # {"eval/forgetting/exact_match": 100.0, ".../kl": 0.0, ".../if_rate_alm": ..., ...}

Every prompt is a text-only user turn (the chat template's defaults, no audio). The **ALM** answers it
through its own path (`models.alm.generate` without audio: the LLM of the ALM, LoRA included); the
**backbone** is the LLM loaded afresh from `model.llm` (the weights the ALM was built on), answering
alone. Both decode greedily with the same template, padding and length limit.

- `exact_match` (percent): prompts whose ALM answer tokens equal the backbone's, up to EOS.
- `kl` (nats, with `kl: true`): the mean over the backbone's answer tokens of KL(backbone || ALM) of the
  next-token distributions, both models teacher-forced on prompt + the backbone's answer.
- `if_rate_alm`, `if_rate_backbone`, `if_delta` (percent; delta = ALM - backbone, Speech-IFEval's
  forgetting delta): the share of the instruction-following prompts whose answer passes its check.

A frozen LLM without LoRA cannot drift, so a DeSTA-style ALM scores 100 / 0 exactly; the suite then guards
against the frozen weights being changed by mistake. With LoRA (MATS) it measures real forgetting. The
backbone's answers are computed once (it is frozen); with `kl: false` it is freed after that.

Prompts: `GENERAL_PROMPTS` and `INSTRUCTION_PROMPTS`, or a JSONL file (`data`) of rows
`{"prompt": str, "check": {...}}` (`check` optional: without one the prompt only counts for exact match
and KL). Checks (all must hold): `words: n` (exactly n words), `max_words` / `min_words: n`,
`bullets: n` (exactly n lines starting with -, * or •), `json: true` (the answer, without a ``` fence,
parses as JSON), `json_keys: [k, ...]` (a JSON object holding those keys), `language: en|fr|es|de`
(the most frequent of those languages' common words), `uppercase: true` (letters present, none lower-case).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.errors import ConfigError, DataError
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.evaluation.answering import Answerer
from alm_jax.weights.alm_params import DTYPES, model_dir
from alm_jax.weights.llm_params import load_llm

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky looks blue.",
    "Give a synonym for the word happy.",
    "What is 12 plus 7?",
    "Name a mammal that lives in the ocean.",
    "Write a short greeting for a colleague's birthday.",
    "What does a thermometer measure?",
    "Suggest a name for a pet goldfish.",
)
INSTRUCTION_PROMPTS = (
    {"prompt": "Describe a sunny beach in at most 15 words.", "check": {"max_words": 15}},
    {"prompt": "Reply with exactly one word: what is the opposite of cold?", "check": {"words": 1}},
    {"prompt": "List three fruits as a bulleted list: three lines starting with '- ', and nothing else.",
     "check": {"bullets": 3}},
    {"prompt": 'Give a JSON object with the keys "city" and "country" for Paris. Reply with the JSON only.',
     "check": {"json_keys": ["city", "country"]}},
    {"prompt": "Return a JSON list of the numbers one to three. Output only JSON.", "check": {"json": True}},
    {"prompt": "Answer in French: what colour is the sky on a clear day?", "check": {"language": "fr"}},
    {"prompt": "Answer in Spanish: what is your favourite season and why?", "check": {"language": "es"}},
    {"prompt": "Write the word hello in capital letters and nothing else.", "check": {"uppercase": True, "words": 1}},
    {"prompt": "Write one sentence of at least 10 words about the moon.", "check": {"min_words": 10}},
)
STOPWORDS = {
    "en": {"the", "and", "is", "are", "of", "to", "in", "it", "a", "that", "on", "with", "for", "my", "this"},
    "fr": {"le", "la", "les", "est", "et", "de", "des", "un", "une", "du", "en", "ciel", "il", "que", "pour"},
    "es": {"el", "la", "los", "las", "es", "y", "de", "que", "un", "una", "en", "mi", "por", "porque", "con"},
    "de": {"der", "die", "das", "ist", "und", "ein", "eine", "nicht", "mit", "ich", "zu", "den", "im", "es", "von"},
}
CHECKS = ("words", "max_words", "min_words", "bullets", "json", "json_keys", "language", "uppercase")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def language_of(text: str) -> str | None:
    """The language in STOPWORDS whose common words occur most often in `text` (None on no hit or a tie)."""
    words = [w.lower() for w in _WORD.findall(text)]
    hits = Counter({lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()})
    ranked = hits.most_common()
    if not ranked or ranked[0][1] == 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    return ranked[0][0]


def _json(text: str):
    try:
        return True, json.loads(_FENCE.sub("", text.strip()))
    except ValueError:
        return False, None


def passes(text: str, check: dict[str, Any]) -> bool:
    """Whether `text` satisfies every condition of `check` (see the module docstring)."""
    for name, want in check.items():
        if name == "words" and word_count(text) != want:
            return False
        if name == "max_words" and word_count(text) > want:
            return False
        if name == "min_words" and word_count(text) < want:
            return False
        if name == "bullets" and sum(bool(re.match(r"\s*[-*•]\s+\S", line)) for line in text.splitlines()) != want:
            return False
        if name in ("json", "json_keys"):
            ok, value = _json(text)
            if not ok or (name == "json_keys" and not (isinstance(value, dict) and set(want) <= set(value))):
                return False
        if name == "language" and language_of(text) != want:
            return False
        if name == "uppercase" and bool(want) != (any(c.isalpha() for c in text) and text == text.upper()):
            return False
    return True


def check_spec(check: Any, where: str) -> dict[str, Any]:
    if not isinstance(check, dict) or not check or set(check) - set(CHECKS):
        raise DataError(f"{where}: `check` must be a non-empty object of {list(CHECKS)}, got {check!r}")
    return check


def load_prompts(path: str) -> list[dict[str, Any]]:
    """Rows `{"prompt": str, "check": {...}?}` of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"forgetting prompts file {p} does not exist; give a JSONL of {{\"prompt\": ...}} rows")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{p}:{n}: each row needs a non-empty string `prompt`")
        if "check" in row:
            check_spec(row["check"], f"{p}:{n}")
        rows.append(row)
    if not rows:
        raise DataError(f"{p} holds no prompts")
    return rows


class ForgettingSuite(GenerationSuite):
    """Text-only answers of the ALM against its freshly loaded frozen backbone (module docstring)."""
    name = "forgetting"
    takes_mesh = True

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/", backbone=None, mesh=None):
        rows = load_prompts(suite.data) if suite.data else (
            [{"prompt": p} for p in GENERAL_PROMPTS] + [dict(r) for r in INSTRUCTION_PROMPTS])
        if suite.limit < 0:
            raise ConfigError(f"suite {self.name}: limit={suite.limit} must be >= 0 (0 = all prompts)")
        self.rows = rows[: suite.limit] if suite.limit else rows
        self.messages = [[{"role": "user", "content": r["prompt"]}] for r in self.rows]
        self.prefix, self.with_kl = prefix, suite.kl
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
        self.backbone = backbone if backbone is not None else load_llm(
            model_dir(cfg.model.llm, "model.llm"), dtype=DTYPES[cfg.model.dtype], mesh=mesh,
            scan_layers=cfg.model.scan_layers)
        self._reference = None    # the backbone's answers, computed once


    def reference(self):
        """The backbone's greedy answers (computed on first use; the backbone is frozen)."""
        if self._reference is None:
            self._reference = self.answerer.llm_answers(self.backbone, self.messages)
            if not self.with_kl:
                self.backbone = None
        return self._reference

    def run(self, model) -> dict[str, float]:
        ref = self.reference()
        alm = self.answerer.alm_answers(model, self.answerer.text_records(self.messages), self.progress)
        same = [a.ids == b.ids for a, b in zip(alm, ref)]
        metrics = {"exact_match": 100.0 * sum(same) / len(same)}
        if self.with_kl:
            metrics["kl"] = self.answerer.token_kl(self.backbone, model.llm, self.messages, ref)
        checked = [(i, r["check"]) for i, r in enumerate(self.rows) if "check" in r]
        if checked:
            ok_alm = [passes(alm[i].text, c) for i, c in checked]
            ok_ref = [passes(ref[i].text, c) for i, c in checked]
            metrics["if_rate_alm"] = 100.0 * sum(ok_alm) / len(checked)
            metrics["if_rate_backbone"] = 100.0 * sum(ok_ref) / len(checked)
            metrics["if_delta"] = metrics["if_rate_alm"] - metrics["if_rate_backbone"]
        self.details = {"metrics": metrics, "items": [
            {**row, "alm": a.text, "backbone": b.text, "same": s,
             **({"alm_passes": passes(a.text, row["check"]), "backbone_passes": passes(b.text, row["check"])}
                if "check" in row else {})}
            for row, a, b, s in zip(self.rows, alm, ref, same)]}
        return {f"{self.prefix}{self.name}/{k}": float(v) for k, v in metrics.items()}
