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

After training, the Santa memory (MATS inference) is built from the same texts: `training_captions(corpora)` (the
distinct `audio_texts` of the training corpus), `build_santa_memory(cfg, texts)` (their CLAP text embeddings,
k-means) and `SantaMemory.save` (`alm santa CKPT_DIR` does all three and writes `<CKPT_DIR>/santa.safetensors`,
which evaluation's answerer loads: `eval.santa`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np

from alm_jax.config import TrainConfig
from alm_jax.data.corpus import Corpus
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.pipeline import (TEXT_AUDIO_PLACEHOLDER, PipelineConfig, caption_tokenizer,
                                   nested_subset_indices)
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.models.connectors.mats import SantaConfig, SantaMemory
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, GenerationItem, Recipe, chat,
                                  check_weights, choose, clip_at, generation_audio, require_seed, training_audio)
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS
from alm_jax.recipes.pools import check_templates, json_pool

RECIPE_ID = "mats"
SANTA_FILE = "santa.safetensors"   # the Santa memory's name in a run's checkpoint.dir (`alm santa`, eval.santa=auto)
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


# ---- the Santa memory of a trained MATS run


def training_captions(corpora: Sequence[str], *, fraction: float = 1.0, limit: int = 0, seed: int = 0) -> list[str]:
    """The distinct texts (`metadata["audio_texts"]`, first-seen order) of the records of `corpora` (of their
    nested `fraction` subsets, the records a run with `data.fraction` reads): what a MATS run trained its mapper on.
    `limit` > 0 keeps a seeded random `limit` of them (MATS caps its bank at 5172)."""
    seen: dict[str, None] = {}
    for k, path in enumerate(corpora):
        corpus = Corpus(path)
        rows = range(len(corpus)) if fraction >= 1.0 else nested_subset_indices(
            len(corpus), fraction, PipelineConfig.subset_seed + k)
        for i in rows:
            for t in corpus[int(i)].metadata.get("audio_texts") or ():
                if isinstance(t, str) and t.strip():
                    seen.setdefault(t, None)
    texts = list(seen)
    if not texts:
        raise ConfigError(f"no audio_texts in {list(corpora)}: the Santa memory is built from a MATS run's training "
                          "corpus (text-only records written by the mats recipe)")
    if 0 < limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts = [texts[i] for i in keep]
    return texts


def build_santa_memory(cfg: TrainConfig, texts: Sequence[str], santa: SantaConfig = SantaConfig(), *,
                       batch_size: int = 256) -> tuple[SantaMemory, np.ndarray]:
    """The Santa memory of MATS run `cfg`: `texts` through its CLAP encoder's tokenizer and text tower (encoder
    0's directory; `caption_tokens` as in training), L2-normalized, clustered by k-means (`santa`: K, iterations,
    top-k, tau, lambda, noise). Returns (memory, k-means inertia per iteration)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.weights.clap_params import load_clap
    captions = caption_tokenizer(cfg)
    if captions is None:
        raise ConfigError("a Santa memory belongs to a MATS run on a CLAP encoder (model.connector.kind=mats, "
                          f"model.encoders.0.kind=clap); this run has {cfg.model.connector.kind!r} on "
                          f"{cfg.model.encoders[0].kind!r}")
    n = len(texts)
    if santa.k > n or santa.n_clusters > n:
        raise ConfigError(f"the Santa memory needs at least max(k={santa.k}, clusters={santa.n_clusters}) texts; the "
                          f"corpus has {n} distinct ones: lower the top-k / the cluster count")
    graphdef, state = nnx.split(load_clap(cfg.model.encoders[0].path))
    embed = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).text_embeds(i, m))
    rows = min(batch_size, n)
    out = []
    for start in range(0, n, rows):   # every batch `rows` long (the last one padded): one compiled program
        chunk = list(texts[start:start + rows])
        ids, mask = captions(chunk + [chunk[0]] * (rows - len(chunk)))
        out.append(np.asarray(embed(state, jnp.asarray(ids), jnp.asarray(mask)))[:len(chunk)])
    memory = SantaMemory(n, out[0].shape[1], santa)
    history = memory.fit(np.concatenate(out, 0))
    return memory, np.asarray(history)


def santa_path(cfg: TrainConfig) -> Path | None:
    """Where the answers of MATS run `cfg` read their Santa memory (`eval.santa`): None for another connector
    kind, for `off`, or for `auto` when `<checkpoint.dir>/santa.safetensors` does not exist."""
    setting = cfg.eval.santa
    if cfg.model.connector.kind != "mats" or setting == "off":
        return None
    if setting == "auto":
        path = Path(cfg.checkpoint.dir) / SANTA_FILE
        return path if path.is_file() else None
    return Path(setting)
