"""The frozen backbone as a reference: what the ALM was trained to imitate, answering from text.

    backbone = load_backbone(cfg, mesh)                        # a DecoderLM from model.llm, the run's dtype
    reference = BackboneReference(answerer, lambda: backbone, chats)   # chats: seed description + question
    reference.texts()                                           # computed once, then the backbone is freed

Suites that compare the ALM with its backbone (`hallucination`, `multi_audio`, `alignment`) ask the backbone
each question with the clip's seed description in the generation layout (`recipes.base.generation_audio`),
i.e. the prompt self-generated targets come from, and the ALM the same question from audio.
"""

from __future__ import annotations

from typing import Callable, Sequence

from alm_jax.config import TrainConfig
from alm_jax.weights.alm_params import DTYPES, model_dir
from alm_jax.weights.llm_params import load_llm


def load_backbone(cfg: TrainConfig, mesh=None):
    """A fresh copy of the run's frozen LLM (`model.llm`) as a `DecoderLM` (dtype and layer scan as the run)."""
    return load_llm(model_dir(cfg.model.llm, "model.llm"), dtype=DTYPES[cfg.model.dtype], mesh=mesh,
                    scan_layers=cfg.model.scan_layers)


class BackboneReference:
    """The backbone's greedy answers to text chats, computed on first use and kept. `load`: a zero-argument
    callable returning the `DecoderLM` (called once, on first use; the model is not kept)."""

    def __init__(self, answerer, load: Callable[[], object], chats: Sequence[Sequence[dict]]):
        self.answerer, self.load, self.chats = answerer, load, list(chats)
        self._texts: list[str] | None = None

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [a.text for a in self.answerer.llm_answers(self.load(), self.chats)]
            self.load = None
        return self._texts

    def compare(self, model, records, bare, progress=None) -> list[tuple[str, str, str]]:
        """Per item `(ALM from audio, backbone from text, ALM without audio)`: `records` are the audio prompts
        (one per chat of this reference), `bare` the same questions without audio."""
        alm = self.answerer.alm(model, records, progress)
        return list(zip(alm, self.texts(), self.answerer.alm(model, bare)))
