"""Hallucination (BALSa / LISTEN style): balanced yes/no questions about sounds that are and are not in a clip.

    suite = HallucinationSuite.build(cfg, SuiteConfig(name="hallucination", clips=40, seed=1))
    suite.run(model)   # {"eval/hallucination/accuracy": ..., ".../f1_no": ..., ".../yes_rate": ...}

Clips come from the demo source (`data.sources.demo.DemoSource(seed)`, exact label sets and a label
vocabulary), 2 to 10 s long but no longer than the run's audio buffer (a longer speech clip is cropped to
it); use a seed the training corpus did not use (held out). For clip `i` (draws keyed by
`(seed, i)`) the suite asks two questions:

- a **present** label: one of the clip's labels -> expected "yes";
- an **absent** label: one of its label vocabulary that is neither among its labels nor co-occurs with its
  context (`recipes.cooccurrence.Cooccurrence.from_source`: a white-noise background *sounds like* white
  noise, so "white noise" is never asked as absent over it) -> expected "no".

So the set is exactly 50% yes / 50% no; a clip with no label or no absent label is left out (`skipped`).
Each question uses one template of `TEMPLATES` (drawn), e.g. `Is there a sound of dog bark in the audio?
Answer yes or no.`, after the audio in the training layout (`<start_audio><audio><end_audio>\\n...`).

The answer is read by `read_yes_no`: the first word if it is yes / no, else the first standalone "yes" or
"no" anywhere, else unparsed (counted wrong, and neither yes nor no). Metrics (percent): `accuracy`,
`precision_no`, `recall_no`, `f1_no` ("no" is the positive class: a hallucination is a "yes" to an absent
sound), `yes_rate` (share of all answers that read yes), `speech_accuracy` / `events_accuracy` (`by_kind`: the
questions about speech / about sound events), `unparsed_rate`, and the counts `questions`,
`skipped_clips`. With `baselines` (the suite config's, default on) two references come with them, on the
same questions: `backbone_text_accuracy` (the frozen backbone answering from the clip's DeSTA seed description
in the generation layout with BALSa's yes/no hints, the prompt BALSa targets come from: the ceiling of what
self-generated targets can teach, computed once) and
`no_audio_accuracy` (the ALM with the question alone). The answers of the last run are in `details`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.records import Record
from alm_jax.data.sources.demo import SPEECH_LABEL, DemoSource
from alm_jax.errors import ConfigError
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.evaluation.answering import Answerer
from alm_jax.evaluation.backbone import BackboneReference, load_backbone
from alm_jax.recipes.base import GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, chat, generation_audio, training_audio
from alm_jax.recipes.cooccurrence import Cooccurrence
from alm_jax.recipes.pools import json_pool

TEMPLATES = ("Is there a sound of {label} in the audio?", "Can you hear {label} in this clip?",
             "Does the recording contain {label}?", "Is {label} audible in this audio?")
ANSWER_FORMAT = "Answer yes or no."
_STREAM = 0x4A11C   # the question draws' own stream, apart from the source's
_WORDS = re.compile(r"[a-z]+")


def questions_for(meta: ClipMeta, index: int, seed: int, cooccurrence: Cooccurrence) -> list[dict[str, Any]] | None:
    """The clip's two questions `[{"label", "expected": "yes"}, {"label", "expected": "no"}]` (each with its
    `question` text), or None when the clip has no label or no absent label."""
    present = sorted(set(meta.labels))
    absent = sorted(cooccurrence.absent_labels(meta))
    if not present or not absent:
        return None
    rng = np.random.default_rng([seed, _STREAM, index])
    out = []
    for label, expected in ((present[rng.integers(len(present))], "yes"), (absent[rng.integers(len(absent))], "no")):
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        out.append({"clip": index, "label": label, "expected": expected,
                    "question": f"{template.format(label=label)} {ANSWER_FORMAT}"})
    return out


def read_yes_no(text: str) -> str | None:
    """'yes' / 'no' read from an answer (first word, else the first standalone yes/no), or None."""
    words = _WORDS.findall(text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    return next((w for w in words if w in ("yes", "no")), None)


def yes_no_metrics(expected: Sequence[str], answers: Sequence[str | None]) -> dict[str, float]:
    """Percent metrics of read answers against expected yes/no ("no" is the positive class)."""
    n = len(expected)
    if n == 0 or len(answers) != n:
        raise ValueError(f"need as many answers as questions (> 0), got {len(answers)} for {n}")
    correct = sum(a == e for a, e in zip(answers, expected))
    said_no = sum(a == "no" for a in answers)
    true_no = sum(a == e == "no" for a, e in zip(answers, expected))
    is_no = sum(e == "no" for e in expected)
    precision = 100.0 * true_no / said_no if said_no else 0.0
    recall = 100.0 * true_no / is_no if is_no else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * correct / n, "precision_no": precision, "recall_no": recall, "f1_no": f1,
            "yes_rate": 100.0 * sum(a == "yes" for a in answers) / n,
            "unparsed_rate": 100.0 * sum(a is None for a in answers) / n, "questions": float(n)}


def by_kind(questions: Sequence[dict[str, Any]], answers: Sequence[str | None]) -> dict[str, float]:
    """Accuracy (percent) on the questions about speech (`speech_accuracy`) and about sound events
    (`events_accuracy`), each only when asked: the overall accuracy mixes a speech detector with a yes/no prior
    on the events (a connector that hears speech and says "no" to every event scores ~70-75% on the demo's
    questions, one that hears speech and says "yes" to every event ~50%)."""
    out = {}
    for key, want in (("speech_accuracy", True), ("events_accuracy", False)):
        pairs = [(q["expected"], a) for q, a in zip(questions, answers) if (q["label"] == SPEECH_LABEL) == want]
        if pairs:
            out[key] = 100.0 * sum(e == a for e, a in pairs) / len(pairs)
    return out


def heldout_clips(suite: SuiteConfig, answerer: Answerer) -> tuple[DemoSource, Cooccurrence]:
    """The held-out demo clips of a single-clip suite (`DemoSource(suite.seed)`, 2 to 10 s but no longer than
    the run's audio buffer) and their co-occurrence rules."""
    longest = min(10.0, answerer.max_seconds)
    source = DemoSource(seed=suite.seed, n_clips=suite.clips, sample_rate=answerer.sample_rate,
                        min_duration=min(2.0, longest), max_duration=longest)
    return source, Cooccurrence.from_source(source)


class HallucinationSuite(GenerationSuite):
    """Balanced present/absent yes/no questions on held-out demo clips (module docstring)."""
    name = "hallucination"
    takes_mesh = True

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/", backbone=None, mesh=None):
        if suite.clips < 1:
            raise ConfigError(f"suite {self.name}: clips={suite.clips} must be >= 1")
        if suite.seed < 0:
            raise ConfigError(f"suite {self.name}: seed={suite.seed} must be >= 0")
        self.prefix = prefix
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
        source, cooccurrence = heldout_clips(suite, self.answerer)
        self.questions: list[dict[str, Any]] = []
        self.records: list[Record] = []
        self.skipped_clips = 0
        for i in range(suite.clips):
            meta, wave = source[i]
            qs = questions_for(meta, i, suite.seed, cooccurrence)
            if qs is None:
                self.skipped_clips += 1
                continue
            clip = self.answerer.clip(wave, source.sample_rate)
            for q in qs:
                self.questions.append({**q, "clip_id": meta.clip_id, "labels": list(meta.labels),
                                       "seed": desta_seed_description(meta)})
                self.records.append(Record(clips=[clip], messages=chat(TRAINING_SYSTEM_PROMPT,
                                                                       f"{training_audio(1)}\n{q['question']}")))
        if suite.limit:
            self.questions, self.records = self.questions[: 2 * suite.limit], self.records[: 2 * suite.limit]
        if not self.questions:
            raise ConfigError(f"suite {self.name}: none of the {suite.clips} demo clips has both a present and an "
                              "absent label; use more clips")
        self.reference = self.bare = None
        if suite.baselines:
            hints = json_pool("balsa.json")["hints"]   # BALSa's yes/no generation prompt, without the answer
            tail = "\n".join(hints[k] for k in ("complete", "yes_no", "listening"))
            texts = [chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio([q['seed']])}\n{q['question']}\n\n{tail}")
                     for q in self.questions]
            self.reference = BackboneReference(self.answerer, (lambda: backbone) if backbone is not None
                                               else (lambda: load_backbone(cfg, mesh)), texts)
            self.bare = [Record(clips=[], messages=chat(TRAINING_SYSTEM_PROMPT, q["question"])) for q in self.questions]

    def run(self, model) -> dict[str, float]:
        answers = self.answerer.alm(model, self.records, self.progress)
        read = [read_yes_no(a) for a in answers]
        metrics = yes_no_metrics([q["expected"] for q in self.questions], read)
        metrics.update(by_kind(self.questions, read))
        metrics["skipped_clips"] = float(self.skipped_clips)
        items = [{**q, "answer": a, "read": r} for q, a, r in zip(self.questions, answers, read)]
        if self.reference is not None:
            expected = [q["expected"] for q in self.questions]
            for key, texts in (("backbone_text", self.reference.texts()), ("no_audio", self.answerer.alm(model, self.bare))):
                reads = [read_yes_no(t) for t in texts]
                metrics[f"{key}_accuracy"] = yes_no_metrics(expected, reads)["accuracy"]
                for item, t, r in zip(items, texts, reads):
                    item[key], item[f"read_{key}"] = t, r
        self.details = {"metrics": metrics, "items": items}
        return {f"{self.prefix}{self.name}/{k}": v for k, v in metrics.items()}
