"""Random access to a source of `(ClipMeta, loader)` pairs (JSONL manifest, TFDS directory) as the generation
engine reads sources: `len(src)` and `src[i] -> (ClipMeta, waveform float32 [samples])`.

A source without random access (the JSONL manifest) is scanned once, up front, for its items (metadata and
loaders; the audio stays on disk); waveforms are decoded on access and multichannel audio is averaged to
mono. The metadata's sample rate is the decoded audio's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from alm_jax.data.metadata import ClipMeta


class RandomAccessWaveforms:
    def __init__(self, source: Any):
        self.source = source
        random = hasattr(source, "__getitem__") and hasattr(source, "__len__")
        self._items = None if random else list(source)

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self.source)

    def __getitem__(self, index: int) -> tuple[ClipMeta, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} of a source with {len(self)} clips")
        meta, load = self._items[index] if self._items is not None else self.source[index]
        wave = load()
        samples = np.asarray(wave.samples, np.float32)
        if samples.ndim == 2:
            samples = samples.mean(axis=1).astype(np.float32)
        if wave.sample_rate != meta.sample_rate:
            meta = dataclasses.replace(meta, sample_rate=int(wave.sample_rate))
        return meta, samples

    @property
    def counter(self):
        """The wrapped source's bad-data counter (skipped lines by kind), when it has one."""
        return getattr(self.source, "counter", None)
