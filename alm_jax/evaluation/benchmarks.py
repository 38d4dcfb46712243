"""Multiple-choice audio benchmarks as evaluators: MMAU, MMSU, MMAR from local copies of their files.

    suite = MMAUSuite.build(cfg, SuiteConfig(name="mmau", data="mmau-test-mini.json", audio_root="MMAU/"))
    suite.run(model)   # {"eval/mmau/accuracy": 61.2, "eval/mmau/task/sound": 70.1, ...}
    suite.details      # the full report of the last run (`multiple_choice.score`), each item with its output

Items are read in their published layouts (`multiple_choice.load_items`):

| suite | file | audio path field | answer | groups |
|---|---|---|---|---|
| mmau | `mmau-test-mini.json` (a JSON list) | `audio_id` (`./test-mini-audios/<id>.wav`) | `answer` in `choices` | task, difficulty, sub-category |
| mmsu | `mmsu.jsonl` (JSON lines) | `audio_path` | `answer_gt` = one of `choice_a..d` | category, sub-category, task_name |
| mmar | `MMAR-meta.jsonl` (JSON lines) | `audio_path` (`./audio/<id>.wav`) | `answer` in `choices` | modality, category, sub-category |

An audio path resolves under `audio_root` (default: the items file's directory) after dropping a leading
`./` or `/`; a missing file is also looked for with the extensions .wav, .flac, .mp3 (DeSTA's resolver
falls back to .wav the same way). Every file is checked when the suite is built. The first `max_seconds` of
the clip (encoder 0's padding) are used.

Prompts (`suite.prompt`):

- `desta`: DeSTA2.5's MMAU evaluation prompt (`kehanlu/DeSTA2.5-Audio:examples/evaluation/MMAU-v05.15.25/
  inference_desta25_audio.py`): system `Focus on the audio clips and instructions. Put your answer in the format
  "The correct answer is: "___" ".`, user `<audio>\\n\\n{question} Choose from the following options: "a", "b",
  "c" or "d"`. As in DeSTA's evaluation, "The correct answer is: " is removed from the output before scoring.
- `plain`: the run's training system prompt, then `<audio>\\n{question}\\nOptions: "a", "b", "c" or "d"\\n
  Answer with one of the options.`
- `official` (MMSU only): MMSU's inference prompt (`dingdongwang/MMSU:mmsu_inference.py`): `Choose the most
  suitable answer from options A, B, C, and D. You must respond with only A, B, C, or D.\\n\\nQuestion: {q}
  \\n\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}`, scored by MMSU's letter rule.

The audio sits where the ALM was trained to find it (`<start_audio><audio><end_audio>`). Scoring is
`multiple_choice.score` with the benchmark's official rule (`rule: auto`: MMSU's letter rule with its own
prompt, MMAU's text rule with the free-text prompts). The scored text is written under the benchmark's
official output key and the raw answer under `raw_output`, so `alm eval score` on `details["items"]`
reproduces the numbers. Generation is greedy (`evaluation.answering`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.records import Record
from alm_jax.errors import ConfigError, DataError
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.evaluation.answering import Answerer
from alm_jax.evaluation.multiple_choice import OUTPUT_KEYS, answer_of, choices_of, load_items, score
from alm_jax.recipes.base import TRAINING_SYSTEM_PROMPT, chat, training_audio

DESTA_SYSTEM_PROMPT = ('Focus on the audio clips and instructions. Put your answer in the format '
                       '"The correct answer is: "___" ".')
DESTA_ANSWER_PREFIX = "The correct answer is: "
MMSU_INSTRUCTION = ("Choose the most suitable answer from options A, B, C, and D. "
                    "You must respond with only A, B, C, or D.")
AUDIO_FIELDS = {"mmau": ("audio_id", "audio_path"), "mmsu": ("audio_path", "audio_id"), "mmar": ("audio_path", "audio_id")}
FALLBACK_EXTENSIONS = (".wav", ".flac", ".mp3")
# report key -> metric name (by_modality repeats MMAR's by_task and is left out of the metrics)
METRIC_GROUPS = {"by_task": "task", "by_difficulty": "difficulty", "by_category": "category",
                 "by_subcategory": "subcategory"}


def quoted_options(choices) -> str:
    """'"a", "b", "c" or "d"' (DeSTA's option list: quoted, comma separated, "or" before the last)."""
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def desta_messages(question: str, choices) -> list[dict[str, str]]:
    """DeSTA2.5's MMAU prompt with one audio placeholder."""
    user = f"{question} Choose from the following options: {quoted_options(choices)}"
    return chat(DESTA_SYSTEM_PROMPT, f"{training_audio(1)}\n\n{user}")


def plain_messages(question: str, choices) -> list[dict[str, str]]:
    """The training system prompt, the audio, the question, the options, a one-line instruction."""
    return chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{question}\nOptions: {quoted_options(choices)}\n"
                                        "Answer with one of the options.")


def mmsu_messages(item: dict) -> list[dict[str, str]]:
    """MMSU's own inference prompt (letters A-D; a missing choice_c / choice_d is printed empty, as theirs)."""
    options = "\n".join(f"{letter}. {item.get(f'choice_{letter.lower()}') or ''}" for letter in "ABCD")
    return chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n\n{MMSU_INSTRUCTION}\n\nQuestion: {item['question']}"
                                        f"\n\n{options}")


def resolve_audio(root: Path, relative: str) -> Path | None:
    """`root / relative` (a leading ./ or / dropped), else the same stem with a fallback extension; None if absent."""
    rel = relative[2:] if relative.startswith("./") else relative.lstrip("/")
    path = root / rel
    if path.is_file():
        return path
    for ext in FALLBACK_EXTENSIONS:
        alt = path.with_suffix(ext)
        if alt.is_file():
            return alt
    return None


class MultipleChoiceSuite(GenerationSuite):
    """A benchmark's items answered by the ALM from audio and scored by the official rule (module docstring).

    `run(model) -> {prefix + name + "/accuracy": percent, ".../task/<t>": percent, ...}`; `details`: the last
    report; `progress`: an optional `(done, total)` callback called after every batch."""
    name = ""
    benchmark = ""

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/"):
        bench = self.benchmark
        if not suite.data:
            raise ConfigError(f"suite {self.name}: give the benchmark's items file (eval.suites entry "
                              f"{{name: {self.name}, data: FILE}}, or `alm eval --data FILE`)")
        if suite.prompt == "official" and bench != "mmsu":
            raise ConfigError(f"suite {self.name}: prompt=official is MMSU's letter prompt; {bench} has no official "
                              "prompt; use prompt=desta or prompt=plain")
        if suite.limit < 0:
            raise ConfigError(f"suite {self.name}: limit={suite.limit} must be >= 0 (0 = all items)")
        self.suite, self.prefix = suite, prefix
        self.rule = suite.rule if suite.rule != "auto" else (
            "official" if bench != "mmsu" or suite.prompt == "official" else "string_match")
        if bench == "mmsu" and self.rule == "official" and suite.prompt != "official":
            raise ConfigError(f"suite {self.name}: MMSU's official rule reads a letter, which only prompt=official "
                              "asks for; use rule=string_match (or auto) with the desta / plain prompts")
        items = load_items(suite.data)
        self.items = items[: suite.limit] if suite.limit else items
        if not self.items:
            raise DataError(f"suite {self.name}: {suite.data} holds no items")
        root = Path(suite.audio_root) if suite.audio_root else Path(suite.data).resolve().parent
        self.audio_paths, missing = [], []
        for i, item in enumerate(self.items):
            for field in ("question",):
                if field not in item:
                    raise DataError(f"suite {self.name}: item {i} of {suite.data} has no `{field}`; is it in the "
                                    f"{bench} layout?")
            answer_of(bench, item)
            if not choices_of(bench, item):
                raise DataError(f"suite {self.name}: item {i} of {suite.data} has no choices")
            relative = next((item[f] for f in AUDIO_FIELDS[bench] if isinstance(item.get(f), str)), None)
            if relative is None:
                raise DataError(f"suite {self.name}: item {i} of {suite.data} names no audio file "
                                f"({' or '.join(AUDIO_FIELDS[bench])})")
            path = resolve_audio(root, relative)
            if path is None:
                missing.append(relative)
            self.audio_paths.append(path)
        if missing:
            raise DataError(f"suite {self.name}: {len(missing)} of {len(self.items)} audio files are missing under "
                            f"{root} (first: {missing[0]}); download the benchmark audio there or set audio_root")
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)


    def messages(self, item: dict) -> list[dict[str, str]]:
        """The chat for one item under this suite's prompt (one audio placeholder)."""
        if self.suite.prompt == "official":
            return mmsu_messages(item)
        build = desta_messages if self.suite.prompt == "desta" else plain_messages
        return build(str(item["question"]), [str(c) for c in choices_of(self.benchmark, item)])

    def scored_text(self, raw: str) -> str:
        """The text that is scored: DeSTA's answer prefix removed for the desta prompt, else the raw answer."""
        return raw.replace(DESTA_ANSWER_PREFIX, "").strip() if self.suite.prompt == "desta" else raw

    def answer_all(self, model) -> list[str]:
        """The ALM's raw answers to every item, batch by batch (audio read per batch)."""
        answers: list[str] = []
        n, bs = len(self.items), self.answerer.batch_size
        for start in range(0, n, bs):
            records = [Record(clips=[self.answerer.clip_from_file(self.audio_paths[i])],
                              messages=self.messages(self.items[i])) for i in range(start, min(start + bs, n))]
            answers += self.answerer.alm(model, records)
            if self.progress:
                self.progress(len(answers), n)
        return answers

    def run(self, model) -> dict[str, float]:
        key = OUTPUT_KEYS[self.benchmark]
        answered = [{**item, "raw_output": raw, key: self.scored_text(raw)}
                    for item, raw in zip(self.items, self.answer_all(model))]
        self.details = score(self.benchmark, answered, rule=self.rule)
        self.details["prompt"] = self.suite.prompt
        return metrics_of(self.details, f"{self.prefix}{self.name}/")


def metrics_of(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """A score report as flat scalar metrics: accuracy, scored, skipped and each group's accuracy."""
    out = {f"{prefix}accuracy": float(report["accuracy"]), f"{prefix}scored": float(report["scored"]),
           f"{prefix}skipped": float(sum(report["skipped"].values()))}
    for group, metric in METRIC_GROUPS.items():
        for value, acc in report.get(group, {}).items():
            out[f"{prefix}{metric}/{value}"] = float(acc)
    return out


class MMAUSuite(MultipleChoiceSuite):
    name = benchmark = "mmau"


class MMSUSuite(MultipleChoiceSuite):
    name = benchmark = "mmsu"


class MMARSuite(MultipleChoiceSuite):
    name = benchmark = "mmar"


def replace_suite(suite: SuiteConfig, **changes) -> SuiteConfig:
    """`suite` with the given (non-None) fields replaced (command-line overrides)."""
    return dataclasses.replace(suite, **{k: v for k, v in changes.items() if v is not None})
