"""The MATS recipe: text-only records (no audio bytes) for training through a text-embedding path.

MATS trains the mapper + LoRA on the CLAP **text** embedding of a clip's caption (plus Gaussian noise),
never on audio; at inference the CLAP audio embedding takes its place (Santa). A record here is:

- `clips`: none; `metadata["audio_texts"]`: the text to embed for each `TEXT_AUDIO_PLACEHOLDER`, in order
  (the clip's caption by default, `embed_text`);
- training messages::

      system:    You are a helpful assistant. The audio clips appear between <start_audio> and <end_audio> tags.
      user:      <start_audio><audio_text><end_audio>
                 Describe the following audio in a caption.
      assistant: A dog barks while a bell rings, over pink noise.

  The pipeline must put the mapper's tokens for `audio_texts[k]` where the k-th `<audio_text>` stands (it
  is not `AUDIO_PLACEHOLDER`, so the record validates with zero clips).

Tasks (drawn per item with probability proportional to `caption`, `classify`, `qa`; MATS' AudioTIA mixes
captioning, classification and QA): `caption`: target = the clip's caption (from metadata, no LLM);
`classify`: target = its labels joined by ", " (no LLM); `qa`: a DeSTA instruction answered by the
backbone LLM from the embedded text only (`[Begin of audio] text [End of audio] instruction`), so the
target never holds what the embedding cannot carry. A `caption` or `classify` item for a clip without a
caption or labels becomes `qa` (`metadata.fallback`). Record metadata: `item_index`, `task`,
`instruction`, `text_only` (True), `audio_texts`, `clip_id`, `clip_duration`, `fallback`.
"""

from __future__ import annotations

from alm_jax.data.metadata import ClipMeta
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, GenerationItem, Recipe, chat,
                                  check_weights, choose, clip_at, generation_audio, require_seed, training_audio)
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS
from alm_jax.recipes.pools import check_templates, json_pool

RECIPE_ID = "mats"
TEXT_AUDIO_PLACEHOLDER = "<audio_text>"
EMBED_TEXTS = ("caption", "desta")
_STREAM = 0x3A75


class MatsRecipe(Recipe):
    """MATS text-only records (see the module docstring).

    caption, classify, qa: task weights; embed_text: `caption` (the clip caption, falling back to the
    DeSTA seed description when there is none) or `desta` (the DeSTA seed description).
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, *, caption: float = 0.4, classify: float = 0.3, qa: float = 0.3,
                 embed_text: str = "caption"):
        super().__init__(seed)
        self.weights = check_weights("MatsRecipe", {"caption": caption, "classify": classify, "qa": qa})
        if embed_text not in EMBED_TEXTS:
            raise ConfigError(f"MatsRecipe: embed_text must be one of {list(EMBED_TEXTS)}, got {embed_text!r}")
        self.embed_text = embed_text
        pool = json_pool("mats.json")
        self.instructions = {"caption": check_templates("mats.json:caption", pool["caption"], set()),
                             "classify": check_templates("mats.json:classify", pool["classify"], set()),
                             "qa": DESTA_INSTRUCTIONS}

    def text_of(self, meta: ClipMeta) -> str:
        """The text embedded in place of the clip's audio."""
        if self.embed_text == "caption" and meta.caption and meta.caption.strip():
            return meta.caption.strip()
        return require_seed(desta_seed_description(meta), meta)

    def item_for(self, index: int, source) -> GenerationItem:
        """Item `index`: clip `index % len(source)` as text, with a caption / classify / QA task."""
        meta, _ = clip_at(source, index)
        text = self.text_of(meta)
        rng = self.rng(index, _STREAM)
        task, fallback = choose(rng, self.weights), None
        labels = list(dict.fromkeys(meta.labels))
        if (task == "caption" and not meta.caption) or (task == "classify" and not labels):
            task, fallback = "qa", f"no_{'caption' if task == 'caption' else 'labels'}"
        pool = self.instructions[task]
        instruction = pool[rng.integers(len(pool))]
        fixed = {"caption": (meta.caption or "").strip(), "classify": ", ".join(labels), "qa": None}[task]
        return GenerationItem(
            generation_messages=chat(GENERATION_SYSTEM_PROMPT, f"{generation_audio([text])}\n{instruction}"),
            record_messages=chat(TRAINING_SYSTEM_PROMPT,
                                 f"{training_audio(1, TEXT_AUDIO_PLACEHOLDER)}\n{instruction}"),
            clips=[], seed_descriptions=[text], recipe=self.recipe_id, source=meta.source, item_id=meta.clip_id,
            seed=self.seed, fixed_response=fixed,
            metadata={"item_index": int(index), "task": task, "instruction": instruction, "text_only": True,
                      "audio_texts": [text], "clip_id": meta.clip_id, "clip_duration": meta.duration,
                      "fallback": fallback})
