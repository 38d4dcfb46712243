"""The BALSa-MA recipe: 2-3 clips per sample, and either "explain the differences" or "one caption covering
all clips"; the backbone LLM answers from the clips' seed descriptions, each labelled with its position.

Generation prompt::

    system: You are a helpful assistant.
    user:   [Begin of audio 1]
            [00:00-00:04] (Audio category: bell, Duration: 3s)
            [End of audio 1]
            [Begin of audio 2]
            [00:00-00:02] Excuse me? (Gender: Female, ...)
            [End of audio 2]
            Explain the differences between these two audio clips.

            Refer to the clips as the first, second and so on, in the order given.
            Answer as someone who has listened to the audio: ...

Training messages (one placeholder per clip, in order)::

    system:    You are a helpful assistant. The audio clips appear between <start_audio> and <end_audio> tags.
    user:      Audio 1: <start_audio><audio><end_audio>
               Audio 2: <start_audio><audio><end_audio>
               Explain the differences between these two audio clips.

Item `index` (draws keyed by `(seed, index)`): `k` clips, `k` uniform in [min_clips, max_clips]; the first
is clip `index % len(source)`, the others distinct clips drawn uniformly from the rest of the source; the
task is `differences` or `joint_caption` with probability proportional to its weight. Record metadata:
`item_index`, `task`, `instruction`, `clip_indices`, `transcripts` (when a clip has speech).
"""

from __future__ import annotations

from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.errors import ConfigError
from alm_jax.recipes.base import (GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, GenerationItem, Recipe, chat,
                                  check_weights, choose, generation_audio, require_seed, training_audio,
                                  transcripts_metadata)
from alm_jax.recipes.pools import check_templates, json_pool

RECIPE_ID = "balsa_ma"
TASKS = ("differences", "joint_caption")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_STREAM = 0xBA15A3A


class BalsaMaRecipe(Recipe):
    """BALSa-MA multi-audio prompts (see the module docstring).

    min_clips, max_clips: clips per sample (2 <= min <= max <= 6); differences, joint_caption: task weights.
    """
    recipe_id = RECIPE_ID

    def __init__(self, seed: int = 0, *, min_clips: int = 2, max_clips: int = 3, differences: float = 1.0,
                 joint_caption: float = 1.0):
        super().__init__(seed)
        if not (isinstance(min_clips, int) and isinstance(max_clips, int) and 2 <= min_clips <= max_clips <= 6):
            raise ConfigError(f"BalsaMaRecipe: need ints 2 <= min_clips <= max_clips <= 6, got {min_clips}, "
                              f"{max_clips}")
        self.min_clips, self.max_clips = min_clips, max_clips
        self.weights = check_weights("BalsaMaRecipe", {"differences": differences, "joint_caption": joint_caption})
        pool = json_pool("balsa_ma.json")
        self.instructions = {task: check_templates(f"balsa_ma.json:{task}", pool[task], {"n"}) for task in TASKS}
        self.hints = dict(pool["hints"])

    def clip_indices(self, index: int, n_source: int) -> list[int]:
        """Source indices of item `index`'s clips: `index % n_source` first, then distinct others."""
        if n_source < self.min_clips:
            raise ConfigError(f"BalsaMaRecipe: the source holds {n_source} clip(s), fewer than min_clips "
                              f"{self.min_clips}; use a bigger source or lower min_clips")
        rng = self.rng(index, _STREAM)
        k = min(int(rng.integers(self.min_clips, self.max_clips + 1)), n_source)
        first = index % n_source
        others = rng.choice(n_source - 1, size=k - 1, replace=False)
        return [first] + [int(j) + int(j >= first) for j in others]   # skip `first` in the draw

    def item_for(self, index: int, source) -> GenerationItem:
        """Item `index`: 2-3 clips of `source` and a differences / joint-caption instruction."""
        indices = self.clip_indices(index, len(source))
        clips = [source[j] for j in indices]
        metas = [meta for meta, _ in clips]
        seeds = [require_seed(desta_seed_description(meta), meta) for meta in metas]
        rng = self.rng(index, _STREAM + 1)
        task = choose(rng, self.weights)
        pool = self.instructions[task]
        instruction = pool[rng.integers(len(pool))].format(n=NUMBER_WORDS[len(clips)])
        user = (f"{generation_audio(seeds)}\n{instruction}\n\n"
                f"{self.hints['refer']}\n{self.hints['listening']}")
        sources = list(dict.fromkeys(meta.source for meta in metas))
        return GenerationItem(
            generation_messages=chat(GENERATION_SYSTEM_PROMPT, user),
            record_messages=chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(len(clips))}\n{instruction}"),
            clips=clips, seed_descriptions=seeds, recipe=self.recipe_id, source="+".join(sources),
            item_id="+".join(meta.clip_id for meta in metas), seed=self.seed,
            metadata={"item_index": int(index), "task": task, "instruction": instruction,
                      "clip_indices": indices, **transcripts_metadata(metas)})
