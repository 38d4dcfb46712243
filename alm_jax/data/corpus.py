"""The corpus on disk: ArrayRecord shards of serialized `Record`s + a manifest; writer and reader.

Layout of a corpus directory:

    layout.json                              n_records, records_per_shard, num_shards (fixed at first write)
    shard-00000-of-00010.arrayrecord         records [0, records_per_shard)
    shard-00000-of-00010.arrayrecord.done.json   count, bytes, sha256, per-shard stats
    ...
    manifest.json                            written last by `finalize_manifest`

Shard i holds the records `record_fn(j)` for j in its range, so shards are independent: process p of P
writes the shards with `i % P == p`, and a rerun skips every shard whose final file and `.done.json`
agree. Each shard is written to `*.tmp` and renamed; every JSON file is replaced atomically.
A `record_fn` that raises `AudioError`/`DataError` skips that record and counts it by kind; the write
stops when the bad fraction passes `max_bad_fraction`. Returning None drops the record (counted as
`filtered`, not as bad).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import json
import operator
import os
import threading
from typing import Any, Callable, Sequence

from alm_jax.data.bad_data import DEFAULT_THRESHOLD, BadDataCounter, data_error, error_kind
from alm_jax.data.records import SCHEMA_VERSION, Record
from alm_jax.errors import AudioError, DataError

FORMAT = "alm_jax.corpus"
# group_size:1 gives one-record random access (what Grain wants). Uncompressed: the audio payload is
# FLAC already, and per-record zstd made metadata-only writes ~5x slower for ~25% smaller files; pass
# writer_options="group_size:1,zstd:3" for text-only corpora where size matters more.
DEFAULT_WRITER_OPTIONS = "group_size:1,uncompressed"
# No readahead: random access reads one record at a time.
DEFAULT_READER_OPTIONS = "readahead_buffer_size:0"
MANIFEST = "manifest.json"
LAYOUT = "layout.json"


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.arrayrecord"


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: str) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _check_layout(out_dir: str, layout: dict[str, Any]) -> None:
    path = os.path.join(out_dir, LAYOUT)
    existing = _read_json(path)
    if existing is None:
        _atomic_write_json(path, layout)
    elif existing != layout:
        raise data_error("layout_mismatch", f"{out_dir} was started with {existing}, this run asks for "
                                            f"{layout}; resume with the same n_records and "
                                            "records_per_shard, or write to a new directory")


def _shard_done(out_dir: str, name: str, verify: bool) -> dict[str, Any] | None:
    """The `.done.json` of a finished shard, or None when the shard must be (re)written."""
    path = os.path.join(out_dir, name)
    done = _read_json(path + ".done.json")
    if done is None or not os.path.isfile(path) or os.path.getsize(path) != done.get("bytes"):
        return None
    if verify and _sha256(path) != done.get("sha256"):
        return None
    return done


def _write_shard(out_dir: str, index: int, num_shards: int, records: range,
                 record_fn: Callable[[int], Record | None], writer_options: str) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordWriter

    name = shard_name(index, num_shards)
    final = os.path.join(out_dir, name)
    tmp = final + ".tmp"
    bad = BadDataCounter()
    per_source: collections.Counter[str] = collections.Counter()
    per_recipe: collections.Counter[str] = collections.Counter()
    count = filtered = 0
    seconds = 0.0
    writer = ArrayRecordWriter(tmp, writer_options)
    try:
        for i in records:
            try:
                rec = record_fn(i)
                data = rec.to_bytes() if rec is not None else None
            except (AudioError, DataError) as e:
                bad.skip(error_kind(e), f"record {i}: {e}")
                continue
            if data is None:
                filtered += 1
                continue
            bad.ok()
            writer.write(data)
            count += 1
            seconds += rec.audio_seconds
            per_source[rec.provenance.source] += 1
            per_recipe[rec.recipe] += 1
    finally:
        writer.close()
    done = {"name": name, "index": index, "count": count, "bytes": os.path.getsize(tmp),
            "sha256": _sha256(tmp), "audio_seconds": seconds, "filtered": filtered,
            "per_source": dict(per_source), "per_recipe": dict(per_recipe), "bad_data": bad.to_dict()}
    os.rename(tmp, final)
    _atomic_write_json(final + ".done.json", done)
    return done


def write_corpus(out_dir: str | os.PathLike, record_fn: Callable[[int], Record | None], n_records: int,
                 records_per_shard: int, process_index: int = 0, process_count: int = 1, *,
                 writer_options: str = DEFAULT_WRITER_OPTIONS,
                 max_bad_fraction: float = DEFAULT_THRESHOLD, min_seen: int = 100,
                 verify_existing: bool = True, finalize: bool | None = None) -> list[dict[str, Any]]:
    """Write this process's shards of records `record_fn(0..n_records-1)`; returns their `.done` stats.

    Finished shards are skipped (checksum re-verified when `verify_existing`). `finalize` (default:
    when `process_count == 1`) writes the manifest afterwards; with several processes call
    `finalize_manifest` once all have finished.
    """
    out_dir = os.fspath(out_dir)
    if n_records <= 0 or records_per_shard <= 0:
        raise data_error("bad_config", f"n_records ({n_records}) and records_per_shard "
                                       f"({records_per_shard}) must be positive")
    if not 0 <= process_index < process_count:
        raise data_error("bad_config", f"process_index {process_index} not in [0, {process_count})")
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-n_records // records_per_shard)
    _check_layout(out_dir, {"format": FORMAT, "n_records": n_records,
                            "records_per_shard": records_per_shard, "num_shards": num_shards})
    counter, stats = BadDataCounter(), []
    for index in range(process_index, num_shards, process_count):
        name = shard_name(index, num_shards)
        done = _shard_done(out_dir, name, verify_existing)
        if done is None:
            span = range(index * records_per_shard, min((index + 1) * records_per_shard, n_records))
            done = _write_shard(out_dir, index, num_shards, span, record_fn, writer_options)
        stats.append(done)
        counter.merge(BadDataCounter.from_dict(done["bad_data"]))
        counter.check(max_bad_fraction, min_seen=min_seen, config_key="corpus.max_bad_fraction")
    if finalize if finalize is not None else process_count == 1:
        finalize_manifest(out_dir)
    return stats


def finalize_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Merge every shard's `.done.json` into `manifest.json` (atomically); returns the manifest.

    Raises `DataError` kind `incomplete_corpus` naming the shards that are not finished.
    """
    out_dir = os.fspath(out_dir)
    layout = _read_json(os.path.join(out_dir, LAYOUT))
    if layout is None:
        raise data_error("incomplete_corpus", f"{out_dir} has no {LAYOUT}; write it with write_corpus first")
    num_shards = layout["num_shards"]
    dones, missing = [], []
    for index in range(num_shards):
        done = _shard_done(out_dir, shard_name(index, num_shards), verify=False)
        if done is None:
            missing.append(index)
        else:
            dones.append(done)
    if missing:
        raise data_error("incomplete_corpus", f"{out_dir}: {len(missing)} of {num_shards} shards are not "
                                              f"finished (indices {missing[:20]}...); rerun write_corpus "
                                              "for the processes that own them (index % process_count)")
    per_source: collections.Counter[str] = collections.Counter()
    per_recipe: collections.Counter[str] = collections.Counter()
    bad = BadDataCounter()
    for d in dones:
        per_source.update(d["per_source"])
        per_recipe.update(d["per_recipe"])
        bad.merge(BadDataCounter.from_dict(d["bad_data"]))
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "n_records_requested": layout["n_records"], "records_per_shard": layout["records_per_shard"],
        "total_records": sum(d["count"] for d in dones),
        "audio_hours": sum(d["audio_seconds"] for d in dones) / 3600.0,
        "filtered": sum(d["filtered"] for d in dones),
        "per_source": dict(sorted(per_source.items())), "per_recipe": dict(sorted(per_recipe.items())),
        "bad_data": bad.to_dict(),
        "shards": [{"name": d["name"], "count": d["count"], "bytes": d["bytes"], "sha256": d["sha256"]}
                   for d in dones],
    }
    _atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


class ShardedArrayRecordSource:
    """Random access (`len`, `[i]`, `__getitems__`) over ArrayRecord shards whose record counts are
    known up front (from the manifest), so constructing it opens no file; each shard's reader opens on
    first access. Thread-safe; picklable (readers reopen in the new process), so Grain workers can use it.

    (`grain.sources.ArrayRecordDataSource` reads the same files, but its constructor starts a thread
    pool over every shard, which made opening a 500-shard corpus take ~0.4 s on 2 cores.)
    """

    def __init__(self, paths: Sequence[str], counts: Sequence[int],
                 reader_options: str = DEFAULT_READER_OPTIONS):
        if len(paths) != len(counts):
            raise ValueError("paths and counts must have the same length")
        self.paths, self.counts = list(paths), [int(c) for c in counts]
        self.reader_options = reader_options
        self._ends = list(itertools.accumulate(self.counts))
        self._readers: list[Any] = [None] * len(self.paths)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> tuple[int, int]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    from array_record.python.array_record_module import ArrayRecordReader

                    reader = ArrayRecordReader(self.paths[shard], self.reader_options,
                                               file_reader_buffer_size=32768)
                    self._readers[shard] = reader
        return reader

    def __getitem__(self, index: int) -> bytes:
        shard, pos = self._locate(index)
        return self._reader(shard).read([pos])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
        """Batch read, grouped by shard."""
        by_shard: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for k, index in enumerate(indices):
            shard, pos = self._locate(index)
            by_shard[shard].append((pos, k))
        out: list[bytes] = [b""] * len(indices)
        for shard, items in by_shard.items():
            for (_, k), data in zip(items, self._reader(shard).read([p for p, _ in items])):
                out[k] = data
        return out

    def close(self) -> None:
        with self._lock:
            for r in self._readers:
                if r is not None:
                    r.close()
            self._readers = [None] * len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "counts": self.counts, "reader_options": self.reader_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"], state["counts"], state["reader_options"])


class Corpus:
    """Random access to a finished corpus: `len(c)`, `c[i] -> Record`, `c.raw(i) -> bytes`.

    `c.source` is the underlying `ShardedArrayRecordSource` of raw record bytes, a random-access source
    for Grain pipelines (`Record.from_bytes` decodes one). Opening reads only `manifest.json`; each
    shard's reader opens on first access.
    """

    def __init__(self, path: str | os.PathLike, reader_options: str = DEFAULT_READER_OPTIONS):
        self.path = os.fspath(path)
        manifest = _read_json(os.path.join(self.path, MANIFEST))
        if manifest is None or manifest.get("format") != FORMAT:
            raise data_error("incomplete_corpus", f"{self.path} has no valid {MANIFEST}; finish writing it "
                                                  "(write_corpus, then finalize_manifest)")
        self.manifest = manifest
        shards = [s for s in manifest["shards"] if s["count"]]
        if not shards:
            raise data_error("empty_corpus", f"{self.path} holds no records")
        self.source = ShardedArrayRecordSource([os.path.join(self.path, s["name"]) for s in shards],
                                               [s["count"] for s in shards], reader_options)

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, index: int) -> bytes:
        return self.source[index]

    def __getitem__(self, index: int) -> Record:
        return Record.from_bytes(self.raw(index))

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        return [Record.from_bytes(b) for b in self.source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"Corpus({self.path!r}, records={len(self)}, shards={len(self.manifest['shards'])})"
