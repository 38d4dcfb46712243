"""Instruction pools (data): the prompts a recipe samples and pairs with a clip.

`DESTA_INSTRUCTIONS` (`prompts/desta_instructions.txt`, 225 instructions) are short, open DeSTA-style
requests about one clip: description, questions about content and timing, reasoning, creative writing and
format-following (lists, word limits, JSON, tables). They are written for this project (DeSTA2.5's own
pool is not released) and phrased so that they make sense for any clip, with or without speech, because
a recipe draws them without looking at the clip. Order matters: recipes pick by index, so append new
instructions at the end of the file to keep existing corpora reproducible.
"""

from __future__ import annotations

from alm_jax.recipes.pools import text_pool

DESTA_INSTRUCTIONS: tuple[str, ...] = text_pool("desta_instructions.txt")
