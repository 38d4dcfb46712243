"""Alignment: does the ALM, hearing a clip, answer as its backbone answers from the clip's text description?

    suite = AlignmentSuite.build(cfg, SuiteConfig(name="alignment", clips=40, seed=1))
    suite.run(model)   # {"eval/alignment/agreement": ..., ".../baseline": ..., ".../accuracy": ...}

Self-generated alignment trains the ALM to answer from audio what the backbone answers from the seed
description. This suite measures exactly that on held-out demo clips (`DemoSource(seed)`, a seed the
training corpus did not use), with a closed-form question so answers compare exactly. Clip `i` (draws
keyed by `(seed, i)`) gets `options` sound names in drawn order: one of its labels and `options - 1`
absent labels (its label vocabulary minus its labels and what co-occurs with its context, as in
`hallucination`), e.g. `Which of these sounds can you hear in the audio: siren, dog bark, speech or tick?
Answer with one of them.` A clip without a label or with too few absent labels is skipped; clips are 2 to 10 s,
no longer than the run's audio buffer (a longer speech clip is cropped to it).

Three greedy answers per clip:

- **ALM from audio**: `<start_audio><audio><end_audio>\\n{question}` (the training layout);
- **backbone from text**: the frozen LLM with the clip's DeSTA seed description in the generation layout
  (`[Begin of audio] ... [End of audio]`), computed once (`backbone.BackboneReference`);
- **no-audio baseline**: the ALM with the question alone.

An answer reads as the option it names first (`read_option`; None when it names none). Metrics (percent):
`agreement` (ALM and backbone read the same option), `baseline` (the no-audio ALM's agreement with the
backbone: what the ALM gets right without listening), `ratio` (agreement / baseline; 0 when the baseline
is 0), `accuracy` / `accuracy_backbone_text` / `accuracy_no_audio` (the option read is the present label),
`unparsed_rate` (ALM answers naming no option), and the counts `items`, `skipped`. Per-item answers are
in `details`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.evaluation.answering import Answerer
from alm_jax.evaluation.backbone import BackboneReference, load_backbone
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.evaluation.hallucination import heldout_clips
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, chat, generation_audio,
                                  join_words, training_audio)

QUESTION = "Which of these sounds can you hear in the audio: {options}? Answer with one of them."
OPTIONS = 4
_STREAM = 0xA119E


def read_option(text: str, options: Sequence[str]) -> str | None:
    """The option `text` names first (whole words, case-insensitive; a longer option wins a tie), or None."""
    low = text.lower()
    best: tuple[int, int, str] | None = None
    for opt in options:
        m = re.search(rf"(?<![a-z]){re.escape(opt.lower())}(?![a-z])", low)
        if m and (best is None or (m.start(), -len(opt)) < best[:2]):
            best = (m.start(), -len(opt), opt)
    return best[2] if best else None


def options_for(labels: Sequence[str], absent: Sequence[str], index: int, seed: int, n_options: int
                ) -> tuple[str, list[str]] | None:
    """`(present label, options in drawn order)` for clip `index`, or None without a label or enough absent ones."""
    present, absent = sorted(set(labels)), sorted(set(absent))
    if not present or len(absent) < n_options - 1:
        return None
    rng = np.random.default_rng([seed, _STREAM, index])
    answer = present[rng.integers(len(present))]
    others = [absent[k] for k in rng.choice(len(absent), size=n_options - 1, replace=False)]
    options = [answer] + others
    return answer, [options[k] for k in rng.permutation(n_options)]


class AlignmentSuite(GenerationSuite):
    """Agreement of the ALM from audio with the backbone from text, against a no-audio baseline (module doc)."""
    name = "alignment"
    takes_mesh = True

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/", backbone=None, mesh=None):
        if suite.clips < 1 or suite.seed < 0:
            raise ConfigError(f"suite {self.name}: clips={suite.clips} must be >= 1 and seed={suite.seed} >= 0")
        self.prefix = prefix
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
        source, cooccurrence = heldout_clips(suite, self.answerer)
        n = min(suite.limit or suite.clips, suite.clips)
        self.items: list[dict[str, Any]] = []
        self.records: list[Record] = []
        self.skipped = 0
        for i in range(n):
            meta, wave = source[i]
            drawn = options_for(meta.labels, cooccurrence.absent_labels(meta), i, suite.seed, OPTIONS)
            if drawn is None:
                self.skipped += 1
                continue
            answer, options = drawn
            question = QUESTION.format(options=join_words(options, "or"))
            self.items.append({"clip": i, "clip_id": meta.clip_id, "labels": list(meta.labels), "options": options,
                               "expected": answer, "question": question, "seed": desta_seed_description(meta)})
            self.records.append(Record(clips=[self.answerer.clip(wave, source.sample_rate)],
                                       messages=chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{question}")))
        if not self.items:
            raise ConfigError(f"suite {self.name}: none of the {n} demo clips has a label and {OPTIONS - 1} absent "
                              "labels; use more clips")
        self.bare = [Record(clips=[], messages=chat(TRAINING_SYSTEM_PROMPT, it["question"])) for it in self.items]
        texts = [chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio([it['seed']])}\n{it['question']}")
                 for it in self.items]
        self.reference = BackboneReference(self.answerer, (lambda: backbone) if backbone is not None
                                           else (lambda: load_backbone(cfg, mesh)), texts)

    def run(self, model) -> dict[str, float]:
        rows = []
        for it, (a, t, b) in zip(self.items, self.reference.compare(model, self.records, self.bare, self.progress)):
            read = {k: read_option(v, it["options"]) for k, v in (("alm", a), ("backbone_text", t), ("no_audio", b))}
            rows.append({**it, "alm": a, "backbone_text": t, "no_audio": b, "read": read})
        pct = lambda flags: 100.0 * sum(flags) / len(flags)
        agree = lambda who: pct([r["read"][who] is not None and r["read"][who] == r["read"]["backbone_text"]
                                 for r in rows])
        metrics = {"agreement": agree("alm"), "baseline": agree("no_audio")}
        metrics["ratio"] = metrics["agreement"] / metrics["baseline"] if metrics["baseline"] else 0.0
        for who, key in (("alm", "accuracy"), ("backbone_text", "accuracy_backbone_text"),
                         ("no_audio", "accuracy_no_audio")):
            metrics[key] = pct([r["read"][who] == r["expected"] for r in rows])
        metrics.update({"unparsed_rate": pct([r["read"]["alm"] is None for r in rows]), "items": float(len(rows)),
                        "skipped": float(self.skipped)})
        self.details = {"metrics": metrics, "items": rows}
        return {f"{self.prefix}{self.name}/{k}": v for k, v in metrics.items()}
