"""Streaming safetensors writer: tensors go to disk one by one into shards of at most `max_shard_bytes`, with
HF's index file when there is more than one shard, so no more than one shard is ever held in host memory.

    w = ShardedSafetensorsWriter(out_dir, max_shard_bytes=parse_size("5GB"))
    for name, array in tensors: w.add(name, array)     # numpy arrays (already on this host)
    files = w.close()    # ["model.safetensors"] or ["model-00001-of-00003.safetensors", ...] + the index
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from alm_jax.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (HF's `max_shard_size` spellings)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"max shard size {text!r}: give a number with a unit, e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"max shard size {text!r} must be positive")
    return size


class ShardedSafetensorsWriter:
    """See the module docstring. `prefix`: file stem ("model" -> model.safetensors / model-0000k-of-0000n);
    `index_name` defaults to `<prefix>.safetensors.index.json` (HF's name)."""

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int, prefix: str = "model",
                 metadata: dict[str, str] | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes, self.prefix = int(max_shard_bytes), prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)

    def _flush(self) -> None:
        path = self.out / f".{self.prefix}-part{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard, gives the shards their final names (and the index when there are several);
        returns the file names written."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.out / f"{self.prefix}.safetensors"
            self._shards[0][0].replace(final)
            return [final.name]
        weight_map, names = {}, []
        for k, (tmp, keys) in enumerate(self._shards, 1):
            final = self.out / f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors"
            tmp.replace(final)
            names.append(final.name)
            weight_map.update({key: final.name for key in keys})
        index = self.out / f"{self.prefix}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        return names + [index.name]
