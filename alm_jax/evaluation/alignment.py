"""Alignment: does the ALM, hearing a clip, answer as its backbone answers from the clip's text description?

    suite = AlignmentSuite.build(cfg, SuiteConfig(name="alignment", clips=40, seed=1))
    suite.run(model)   # {"eval/alignment/agreement": ..., ".../baseline": ..., ".../accuracy": ...}

Self-generated alignment trains the ALM to answer from audio what the backbone answers from the seed
description. This suite measures exactly that on held-out sound-event clips (`DemoSource(seed,
kinds=("events",))`, a seed the training corpus did not use; 2 to 10 s, no longer than the run's audio
buffer): every clip gets the question `QUESTION` ("What is the main sound in this audio?") and three
greedy answers:

- **ALM from audio**: `<start_audio><audio><end_audio>\\n{question}` (the training layout);
- **backbone from text**: the frozen LLM with the clip's DeSTA seed description in the generation layout
  (`[Begin of audio] ... [End of audio]`) and the recipes' listening hint (`recipes/prompts/balsa.json`),
  i.e. the prompt self-generated targets come from; computed once (`backbone.BackboneReference`);
- **no-audio baseline**: the ALM with the question alone.

Each answer reads as the sound class it names first (`read_label` over the source's event classes:
whole words, a word may carry a suffix and words may be joined by a hyphen, so "dogs barking" and
"high-beep" read as `dog bark` and `high beep`; a class's own noun alone names it too, so "a clock", "a
barking dog" and "a stream of water" read as `clock ticking`, `dog bark`, `water drip` (`synth.EVENT_NOUNS`;
the beeps and noises share theirs and need their full name); None when it names none). The three answers
are read alike, so the reader moves the ALM, the backbone and the baseline together. The question is open because
SmolLM2-135M, given the seed description, mostly copies the description's markup when asked to choose
among listed options (measured: 2-4 of 16 answers readable), while it names the main sound when asked
openly. Metrics (percent): `agreement` (ALM and backbone read the same class), `baseline` (the no-audio
ALM's agreement with the backbone: what the ALM matches without listening), `ratio` (agreement /
baseline; 0 when the baseline is 0), `accuracy` / `accuracy_backbone_text` / `accuracy_no_audio` (the
class read is one of the clip's labels), `readable_backbone` (backbone answers that name a class),
`unparsed_rate` (ALM answers naming none), `constant_baseline` (the agreement of the best constant answer:
the share of clips for which the backbone names its most frequent class; an ALM naming one class for every
clip scores at most this), `distinct_alm` (how many classes the ALM names over the clips), and the counts
`items`, `skipped` (clips without a label).
Per-item answers are in `details`.
"""

from __future__ import annotations

from alm_jax.audio.synth import EVENT_NOUNS
from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.evaluation.answering import Answerer
from alm_jax.evaluation.backbone import BackboneReference, load_backbone
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, chat, generation_audio, read_label,
                                  training_audio)
from alm_jax.recipes.pools import json_pool

QUESTION = "What is the main sound in this audio?"


class AlignmentSuite(GenerationSuite):
    """Agreement of the ALM from audio with the backbone from text, against a no-audio baseline (module doc)."""
    name = "alignment"
    takes_mesh = True

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/", backbone=None, mesh=None):
        if suite.clips < 1 or suite.seed < 0:
            raise ConfigError(f"suite {self.name}: clips={suite.clips} must be >= 1 and seed={suite.seed} >= 0")
        self.prefix = prefix
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
        longest = min(10.0, self.answerer.max_seconds)
        source = DemoSource(seed=suite.seed, n_clips=suite.clips, kinds=("events",),
                            sample_rate=self.answerer.sample_rate, min_duration=min(2.0, longest),
                            max_duration=longest)
        self.vocabulary = sorted(source.label_vocabulary)
        n = min(suite.limit or suite.clips, suite.clips)
        self.items, self.records, self.skipped = [], [], 0
        for i in range(n):
            meta, wave = source[i]
            if not meta.labels:
                self.skipped += 1
                continue
            self.items.append({"clip": i, "clip_id": meta.clip_id, "labels": list(meta.labels),
                               "question": QUESTION, "seed": desta_seed_description(meta)})
            self.records.append(Record(clips=[self.answerer.clip(wave, source.sample_rate)],
                                       messages=chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{QUESTION}")))
        if not self.items:
            raise ConfigError(f"suite {self.name}: none of the {n} demo clips has a label; use more clips")
        self.bare = [Record(clips=[], messages=chat(TRAINING_SYSTEM_PROMPT, QUESTION)) for _ in self.items]
        listening = json_pool("balsa.json")["hints"]["listening"]
        texts = [chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio([it['seed']])}\n{QUESTION}\n\n{listening}")
                 for it in self.items]
        self.reference = BackboneReference(self.answerer, (lambda: backbone) if backbone is not None
                                           else (lambda: load_backbone(cfg, mesh)), texts)

    def run(self, model) -> dict[str, float]:
        rows = []
        for it, (a, t, b) in zip(self.items, self.reference.compare(model, self.records, self.bare, self.progress)):
            read = {k: read_label(v, self.vocabulary, EVENT_NOUNS)
                    for k, v in (("alm", a), ("backbone_text", t), ("no_audio", b))}
            rows.append({**it, "alm": a, "backbone_text": t, "no_audio": b, "read": read})
        pct = lambda flags: 100.0 * sum(flags) / len(flags)
        agree = lambda who: pct([r["read"][who] is not None and r["read"][who] == r["read"]["backbone_text"]
                                 for r in rows])
        metrics = {"agreement": agree("alm"), "baseline": agree("no_audio")}
        metrics["ratio"] = metrics["agreement"] / metrics["baseline"] if metrics["baseline"] else 0.0
        for who, key in (("alm", "accuracy"), ("backbone_text", "accuracy_backbone_text"),
                         ("no_audio", "accuracy_no_audio")):
            metrics[key] = pct([r["read"][who] in r["labels"] for r in rows])
        # an ALM that gives every clip the same answer agrees as often as the backbone names that class: the best
        # such constant is a second baseline, and `distinct_alm` tells a listening ALM from a constant one
        named = {r["read"]["backbone_text"] for r in rows} - {None}
        metrics["constant_baseline"] = max((pct([r["read"]["backbone_text"] == c for r in rows]) for c in named),
                                           default=0.0)
        metrics["distinct_alm"] = float(len({r["read"]["alm"] for r in rows} - {None}))
        metrics.update({"readable_backbone": pct([r["read"]["backbone_text"] is not None for r in rows]),
                        "unparsed_rate": pct([r["read"]["alm"] is None for r in rows]), "items": float(len(rows)),
                        "skipped": float(self.skipped)})
        self.details = {"metrics": metrics, "items": rows}
        return {f"{self.prefix}{self.name}/{k}": v for k, v in metrics.items()}
