"""Multi-audio (MAE-style) closed-form questions over two clips, and alignment agreement with the backbone.

    suite = MultiAudioSuite.build(cfg, SuiteConfig(name="multi_audio", clips=40, seed=1))   # data.max_clips >= 2
    suite.run(model)   # {"eval/multi_audio/accuracy": ..., ".../agreement": ..., ".../task/longer": ...}

Item `k` (draws keyed by `(seed, k)`) is task `TASKS[k % len(TASKS)]` over two clips, with an exact answer:

| task | clips | question | answer |
|---|---|---|---|
| `contains` | demo clips 2k, 2k+1 | Which audio contains a sound of X, Audio 1 or Audio 2? | the clip with label X (X is not in, nor co-occurs with, the other) |
| `longer` | demo clip 2k and the first of clip 2k+1 and 8 further clips whose duration is >= 1 s apart | Which audio is longer, ...? | the longer clip |
| `louder` | demo clip 2k and itself 10 dB quieter, in drawn order | Which audio is louder, ...? | the unscaled copy |
| `same_sentence` | one sentence (or a one-word edit of it, `synth.SENTENCE_SWAPS`) spoken by two voices | Do the two audios say the same sentence? | yes / no, drawn 50/50 |

Demo clips are 1/3 to 10 s long (at most the run's audio buffer, `max_seconds`; event clips only when that
is under 3 s). Items whose clips do not qualify (no distinguishing label, no duration gap found, a clip
longer than the audio buffer) are skipped (`skipped`); `same_sentence` is left out without espeak-ng.

Three answers per item, all greedy:

- **ALM from audio**: `Audio 1: <start_audio><audio><end_audio>\\nAudio 2: ...\\n{question}` (the training layout);
- **backbone from text**: the frozen LLM (loaded from `model.llm`) reads both clips' DeSTA seed descriptions
  in the generation layout (`[Begin of audio 1] ... [End of audio 2]`, a louder / quieter clip's description
  says so), i.e. what the ALM was trained to imitate; computed once;
- **no-audio baseline**: the ALM with the question alone.

Answers are read as "1" / "2" (`read_choice`: the first `audio 1`, `first`, `1`, ... in the text; an answer that
opens with "Audio 1:" describes the clips in turn and chooses none) or yes / no.
Metrics (percent): `accuracy` (ALM vs the exact answer), `accuracy_backbone_text`, `accuracy_no_audio`,
`agreement` (ALM and backbone read the same answer), `agreement_no_audio` (the no-audio baseline's
agreement with the backbone), `unreadable` (ALM answers read as neither), `task/<task>` (ALM accuracy per task),
and the counts `items`, `skipped`.
An unreadable answer is wrong and agrees with nothing.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from alm_jax.audio import synth
from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.metadata import ClipMeta, Speech
from alm_jax.data.records import Record
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.seed_descriptions import format_span
from alm_jax.data.sources.demo import KINDS, DemoSource
from alm_jax.errors import ConfigError
from alm_jax.evaluation.base import GenerationSuite
from alm_jax.evaluation.answering import Answerer
from alm_jax.evaluation.backbone import BackboneReference, load_backbone
from alm_jax.evaluation.hallucination import read_yes_no
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, chat, generation_audio,
                                  training_audio)
from alm_jax.recipes.cooccurrence import Cooccurrence

TASKS = ("contains", "longer", "louder", "same_sentence")
WHICH = 'Answer "Audio 1" or "Audio 2".'
QUIETER_DB = 10.0
MIN_DURATION_GAP = 1.0   # seconds
SPEECH_SECONDS = 3.0     # buffers shorter than this draw event clips only
_LONGER_TRIES = 8        # further clips tried for the second clip of a `longer` item
_STREAM = 0x3A0D10
_LISTING = re.compile(r"\s*(?:audio|clip)\s*[12]\s*:")
_CHOICE = re.compile(r"\b(?:audio|clip)\s*([12])\b|\b(first|second|one|two)\b|\b([12])\b")


def read_choice(text: str) -> str | None:
    """'1' / '2' read from an answer: the first `audio 1` / `clip 2` / `first` / `second` / `one` / `two` /
    a bare 1 or 2; None when there is none, or when the answer opens with a clip's label and a colon
    ('Audio 1: "Calm"\nAudio 2: ...'): a description of each clip in turn, not a choice."""
    text = text.lower()
    if _LISTING.match(text):
        return None
    m = _CHOICE.search(text)
    if not m:
        return None
    word = m.group(1) or m.group(3) or m.group(2)
    return {"first": "1", "one": "1", "second": "2", "two": "2"}.get(word, word)


def _speech_meta(clip_id: str, text: str, voice: str, seconds: float, sample_rate: int) -> ClipMeta:
    return ClipMeta(clip_id=clip_id, source="eval", duration=seconds, sample_rate=sample_rate, labels=("speech",),
                    speech=(Speech(text, 0.0, seconds, {"gender": synth.VOICES[voice]}),))


class MultiAudioSuite(GenerationSuite):
    """Two-clip closed-form questions on held-out synthetic audio, with backbone agreement (module docstring)."""
    name = "multi_audio"
    takes_mesh = True

    def __init__(self, cfg: TrainConfig, suite: SuiteConfig, *, prefix: str = "eval/", backbone=None, mesh=None):
        if cfg.data.max_clips < 2:
            raise ConfigError(f"suite {self.name} puts two clips in a prompt; set data.max_clips >= 2 "
                              f"(it is {cfg.data.max_clips})")
        if suite.clips < 1 or suite.seed < 0:
            raise ConfigError(f"suite {self.name}: clips={suite.clips} must be >= 1 and seed={suite.seed} >= 0")
        self.prefix = prefix
        self.answerer = Answerer(cfg, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
        self.sample_rate = self.answerer.sample_rate
        longest = min(10.0, self.answerer.max_seconds)
        kinds = KINDS if longest >= SPEECH_SECONDS else ("events",)   # speech would not fit a short buffer
        self.source = DemoSource(seed=suite.seed, n_clips=2 * suite.clips, kinds=kinds, sample_rate=self.sample_rate,
                                 min_duration=min(1.0, longest / 3), max_duration=longest)
        self.n_items = suite.clips
        self.cooccurrence = Cooccurrence.from_source(self.source)
        self.tasks = TASKS if synth.speech_available() else tuple(t for t in TASKS if t != "same_sentence")
        self.seed = suite.seed
        n = suite.limit or suite.clips
        self.items: list[dict[str, Any]] = []
        self.skipped = 0
        for k in range(min(n, suite.clips)):
            item = self._item(k)
            if item is None:
                self.skipped += 1
            else:
                self.items.append(item)
        if not self.items:
            raise ConfigError(f"suite {self.name}: none of {suite.clips} items qualified; use more clips")
        self.records = [Record(clips=it.pop("clips"), messages=chat(
            TRAINING_SYSTEM_PROMPT, f"{training_audio(2)}\n{it['question']}")) for it in self.items]
        texts = [chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio(it['seeds'])}\n{it['question']}")
                 for it in self.items]
        self.bare = [Record(clips=[], messages=chat(TRAINING_SYSTEM_PROMPT, it["question"])) for it in self.items]
        self.reference = BackboneReference(self.answerer, (lambda: backbone) if backbone is not None
                                           else (lambda: load_backbone(cfg, mesh)), texts)


    # ---- items

    def _fits(self, wave: np.ndarray) -> bool:
        return wave.shape[0] <= self.answerer.builder.audio.buffer_samples

    def _item(self, k: int) -> dict[str, Any] | None:
        task = self.tasks[k % len(self.tasks)]
        rng = np.random.default_rng([self.seed, _STREAM, k])
        clip = lambda w: self.answerer.clip(w, self.sample_rate)
        if task == "same_sentence":
            return self._sentence_item(rng, clip)
        (ma, wa), (mb, wb) = self.source[2 * k], self.source[2 * k + 1]
        if not (self._fits(wa) and self._fits(wb)):
            return None
        if task == "contains":
            only_a = sorted(set(ma.labels) - self.cooccurrence.excluded(mb))
            only_b = sorted(set(mb.labels) - self.cooccurrence.excluded(ma))
            options = [(label, "1") for label in only_a] + [(label, "2") for label in only_b]
            if not options:
                return None
            label, answer = options[rng.integers(len(options))]
            return {"task": task, "question": f"Which audio contains a sound of {label}, Audio 1 or Audio 2? {WHICH}",
                    "expected": answer, "clips": [clip(wa), clip(wb)], "labels": [list(ma.labels), list(mb.labels)],
                    "seeds": [desta_seed_description(ma), desta_seed_description(mb)]}
        if task == "longer":
            for m in range(_LONGER_TRIES):   # look further (clips past the others' range) for a long enough gap
                if abs(ma.duration - mb.duration) >= MIN_DURATION_GAP and self._fits(wb):
                    break
                mb, wb = self.source.clip(2 * self.n_items + _LONGER_TRIES * k + m)
            else:
                return None
            return {"task": task, "question": f"Which audio is longer, Audio 1 or Audio 2? {WHICH}",
                    "expected": "1" if ma.duration > mb.duration else "2", "clips": [clip(wa), clip(wb)],
                    "seeds": [desta_seed_description(ma), desta_seed_description(mb)]}
        # louder: one clip and its quieter copy
        loud_first = bool(rng.random() < 0.5)
        quiet = (wa * 10 ** (-QUIETER_DB / 20)).astype(np.float32)
        seed = desta_seed_description(ma)
        span = format_span(0.0, ma.duration)
        loud_seed, quiet_seed = f"{span} (Volume: high)\n{seed}", f"{span} (Volume: low, {QUIETER_DB:g} dB quieter)\n{seed}"
        waves, seeds = ([wa, quiet], [loud_seed, quiet_seed]) if loud_first else ([quiet, wa], [quiet_seed, loud_seed])
        return {"task": task, "question": f"Which audio is louder, Audio 1 or Audio 2? {WHICH}",
                "expected": "1" if loud_first else "2", "clips": [clip(w) for w in waves], "seeds": seeds}

    def _sentence_item(self, rng: np.random.Generator, clip) -> dict[str, Any] | None:
        sentences = sorted(synth.SENTENCE_SWAPS)
        text = sentences[rng.integers(len(sentences))]
        same = bool(rng.random() < 0.5)
        other = text
        if not same:
            swaps = synth.SENTENCE_SWAPS[text]
            word = sorted(swaps)[rng.integers(len(swaps))]
            other = re.sub(rf"\b{re.escape(word)}\b", swaps[word][rng.integers(len(swaps[word]))], text, count=1)
        voices = sorted(synth.VOICES)
        first, second = rng.choice(len(voices), size=2, replace=False)
        metas, clips = [], []
        for n, (t, v) in enumerate(((text, voices[first]), (other, voices[second]))):
            wave = synth.synthesize_speech(t, v, 160, 50, self.sample_rate)
            if not self._fits(wave):
                return None
            clips.append(clip(wave))
            metas.append(_speech_meta(f"sentence-{n}", t, v, wave.shape[0] / self.sample_rate, self.sample_rate))
        return {"task": "same_sentence", "question": "Do the two audios say the same sentence? Answer yes or no.",
                "expected": "yes" if same else "no", "clips": clips, "seeds": [desta_seed_description(m) for m in metas]}

    # ---- run

    def _read(self, item: dict[str, Any], text: str) -> str | None:
        return read_yes_no(text) if item["task"] == "same_sentence" else read_choice(text)

    def run(self, model) -> dict[str, float]:
        rows = []
        for it, (a, t, b) in zip(self.items, self.reference.compare(model, self.records, self.bare, self.progress)):
            ra, rt, rb = self._read(it, a), self._read(it, t), self._read(it, b)
            rows.append({"task": it["task"], "question": it["question"], "expected": it["expected"], "seeds": it["seeds"],
                         "labels": it.get("labels"),
                         "alm": a, "backbone_text": t, "no_audio": b, "read": {"alm": ra, "backbone_text": rt, "no_audio": rb}})
        pct = lambda flags: 100.0 * sum(flags) / len(flags)
        read = [r["read"] for r in rows]
        metrics = {
            "accuracy": pct([r["alm"] == row["expected"] for r, row in zip(read, rows)]),
            "accuracy_backbone_text": pct([r["backbone_text"] == row["expected"] for r, row in zip(read, rows)]),
            "accuracy_no_audio": pct([r["no_audio"] == row["expected"] for r, row in zip(read, rows)]),
            "agreement": pct([r["alm"] is not None and r["alm"] == r["backbone_text"] for r in read]),
            "agreement_no_audio": pct([r["no_audio"] is not None and r["no_audio"] == r["backbone_text"] for r in read]),
            "unreadable": pct([r["alm"] is None for r in read]),
            "items": float(len(rows)), "skipped": float(self.skipped)}
        for task in self.tasks:
            flags = [r["alm"] == row["expected"] for r, row in zip(read, rows) if row["task"] == task]
            if flags:
                metrics[f"task/{task}"] = pct(flags)
        self.details = {"metrics": metrics, "items": rows}
        return {f"{self.prefix}{self.name}/{k}": v for k, v in metrics.items()}
