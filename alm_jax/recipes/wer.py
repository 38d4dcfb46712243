"""Word error rate: (substitutions + deletions + insertions) / reference words, after text normalization.

Normalization (both sides): lower case, every character that is not a letter, a digit or an apostrophe
becomes a space, then split on whitespace. `word_error_rate("Hello, world!", "hello word") == 0.5`.
An empty reference gives 0.0 against an empty hypothesis and 1.0 against anything else.
"""

from __future__ import annotations

import re
from typing import Sequence

_NOT_WORD = re.compile(r"[^\w']|_")


def normalize_words(text: str) -> list[str]:
    """The words of `text` after normalization (see the module docstring)."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (unit costs), O(len(ref) * len(hyp)) time."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1,                           # deletion
                               current[j - 1] + 1,                        # insertion
                               previous[j - 1] + (ref_word != hyp_word)))  # substitution / match
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of `hypothesis` against `reference` (see the module docstring); may exceed 1."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)
