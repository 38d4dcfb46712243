"""The corpus on disk: ArrayRecord shards of serialized `Record`s + a manifest; writer and reader.

Layout of a corpus directory:

    layout.json                              n_records, records_per_shard, num_shards and the settings
                                             that produce the records (fixed at first write)
    shard-00000-of-00010.arrayrecord         records [0, records_per_shard)
    shard-00000-of-00010.arrayrecord.done.json   count, bytes, sha256, per-shard stats
    ...
    manifest.json                            written last by `finalize_manifest`
    .verified.json                           shards whose sha256 a reader has checked (size, mtime, hash)

Shard i holds the records `record_fn(j)` for j in its range, so shards are independent: process p of P
writes the shards with `i % P == p`, and a rerun skips every shard whose final file and `.done.json`
agree. Each shard is written to `*.tmp` and renamed; every JSON file is replaced atomically.
A `record_fn` that raises `AudioError`/`DataError` skips that record and counts it by kind; the write
stops when the bad fraction passes `max_bad_fraction`. Returning None drops the record (counted as
`filtered`, not as bad). Every clip is decoded and checked before it is written (decodable, finite,
non-empty, at most `max_audio_seconds`, sample rate and duration as its header says): a bad clip skips
its record, counted by the audio error's kind.

Settings: `write_corpus(..., settings={...})` records what produces the records (recipe, seed, model,
sampling...) in layout.json; a resume with other settings raises `DataError` kind `settings_mismatch`
listing the differences (a corpus never mixes records of two settings).

Reading (`Corpus`): manifest.json is checked (format, fields), every shard path must be a file name
inside the corpus directory (kind `path_traversal` otherwise), and every shard must exist with the
manifest's size; its sha256 is checked on the first open (remembered in `.verified.json`, keyed by size
and mtime) or by `verify_corpus` / `alm corpus verify`. A damaged shard raises `DataError` kind
`corrupt_shard` naming it and the fix; a reader error later on (e.g. a shard damaged after the check)
is re-raised the same way.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import json
import logging
import operator
import re
import os
import threading
from typing import Any, Callable, Sequence

from alm_jax.audio import io as audio_io
from alm_jax.data.bad_data import DEFAULT_THRESHOLD, BadDataCounter, data_error, error_kind
from alm_jax.data.records import SCHEMA_VERSION, Record
from alm_jax.errors import AudioError, DataError

log = logging.getLogger(__name__)

FORMAT = "alm_jax.corpus"
# group_size:1 gives one-record random access (what Grain wants). Uncompressed: the audio payload is
# FLAC already, and per-record zstd made metadata-only writes ~5x slower for ~25% smaller files; pass
# writer_options="group_size:1,zstd:3" for text-only corpora where size matters more.
DEFAULT_WRITER_OPTIONS = "group_size:1,uncompressed"
# No readahead: random access reads one record at a time.
DEFAULT_READER_OPTIONS = "readahead_buffer_size:0"
MANIFEST = "manifest.json"
LAYOUT = "layout.json"
VERIFIED = ".verified.json"
_LAYOUT_KEYS = ("format", "n_records", "records_per_shard", "num_shards")


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


def _load_json(path: str) -> tuple[Any, str | None]:
    """`(value, None)`; `(None, None)` when the file does not exist; `(None, why)` when it is unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read it: {e}"
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not valid JSON ({e}; {len(raw)} bytes)"


def _read_json(path: str) -> Any | None:
    """The JSON value of `path`, or None when it is missing or unreadable."""
    return _load_json(path)[0]


# --- settings: what produced a corpus's records -----------------------------------------------------------

_UNSET = "<unset>"


def _normalized(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as they read back from JSON (tuples become lists; other objects their `str`)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_differences(recorded: dict[str, Any], requested: dict[str, Any], prefix: str = "") -> list[str]:
    """One `key: recorded (this run: requested)` line per differing leaf (nested dicts by dotted key)."""
    out = []
    for k in sorted(set(recorded) | set(requested)):
        a, b = recorded.get(k, _UNSET), requested.get(k, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} (this run: {json.dumps(b)})")
    return out


def _layout(n_records: int, records_per_shard: int, settings: dict[str, Any] | None) -> dict[str, Any]:
    layout = {"format": FORMAT, "n_records": n_records, "records_per_shard": records_per_shard,
              "num_shards": -(-n_records // records_per_shard)}
    if settings is not None:
        layout["settings"] = _normalized(settings)
    return layout


def check_resume(out_dir: str | os.PathLike, n_records: int, records_per_shard: int,
                 settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The layout recorded in `out_dir` (None for a new corpus); raises `DataError` when a write with these
    parameters must not continue it: kind `layout_mismatch` (other n_records / records_per_shard), kind
    `settings_mismatch` (other `settings`; the error's `recorded` is the recorded layout, `differences` the
    differing keys) or kind `bad_layout` (layout.json is damaged). Writes nothing."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, LAYOUT)
    existing, problem = _load_json(path)
    if problem is None and existing is not None and not isinstance(existing, dict):
        problem = "not a JSON object"
    if problem is not None:
        raise data_error("bad_layout", f"{path} is damaged ({problem}), so the settings of the records already in "
                                       f"{out_dir} are unknown; write the corpus to a new directory, or delete "
                                       f"{path} to continue it with this run's settings (only if its shards were "
                                       "written with them)")
    if existing is None:
        return None
    layout = _layout(n_records, records_per_shard, settings)
    got, want = ({k: d.get(k) for k in _LAYOUT_KEYS} for d in (existing, layout))
    if got != want:
        err = data_error("layout_mismatch",
                         f"{out_dir} was started with n_records={got['n_records']}, records_per_shard="
                         f"{got['records_per_shard']}; this run asks for n_records={n_records}, records_per_shard="
                         f"{records_per_shard}; resume with the same values, or write to a new directory")
        err.recorded, err.differences = existing, settings_differences(got, want)
        raise err
    recorded = existing.get("settings")
    if settings is not None and recorded is not None and recorded != layout["settings"]:
        diffs = settings_differences(recorded, layout["settings"])
        how = f": {existing['command']}" if existing.get("command") else f" (recorded in {path})"
        err = data_error("settings_mismatch",
                         f"{out_dir} holds records written with other settings: {'; '.join(diffs)}. A corpus never "
                         "mixes the records of two settings: write this run to a new directory, or continue "
                         f"{out_dir} with the settings it was started with{how}")
        err.recorded, err.differences = existing, diffs
        raise err
    return existing


def _start_layout(out_dir: str, n_records: int, records_per_shard: int, settings: dict[str, Any] | None,
                  command: str | None) -> None:
    existing = check_resume(out_dir, n_records, records_per_shard, settings)
    layout = _layout(n_records, records_per_shard, settings)
    if command is not None and settings is not None:
        layout["command"] = command
    path = os.path.join(out_dir, LAYOUT)
    if existing is None:
        _atomic_write_json(path, layout)
    elif settings is not None and existing.get("settings") is None:
        log.warning("%s records no settings (an older alm_jax, or a write without settings); recording this "
                    "run's settings now: the shards already written cannot be checked against them", out_dir)
        _atomic_write_json(path, {**existing, **layout})


# --- writing ----------------------------------------------------------------------------------------------

def _shard_done(out_dir: str, name: str, verify: bool) -> dict[str, Any] | None:
    """The `.done.json` of a finished shard, or None when the shard must be (re)written."""
    path = os.path.join(out_dir, name)
    done = _read_json(path + ".done.json")
    if not isinstance(done, dict) or not os.path.isfile(path) or os.path.getsize(path) != done.get("bytes"):
        return None
    if verify and _sha256(path) != done.get("sha256"):
        return None
    return done


def _write_shard(out_dir: str, index: int, num_shards: int, records: range,
                 record_fn: Callable[[int], Record | None], writer_options: str,
                 max_audio_seconds: float | None) -> dict[str, Any]:
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
                if rec is not None and max_audio_seconds is not None:
                    rec.check_audio(max_audio_seconds)
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
                 verify_existing: bool = True, finalize: bool | None = None,
                 settings: dict[str, Any] | None = None, resume_command: str | None = None,
                 check_audio: bool = True,
                 max_audio_seconds: float = audio_io.DEFAULT_MAX_SECONDS) -> list[dict[str, Any]]:
    """Write this process's shards of records `record_fn(0..n_records-1)`; returns their `.done` stats.

    Finished shards are skipped (checksum re-verified when `verify_existing`). `finalize` (default:
    when `process_count == 1`) writes the manifest afterwards; with several processes call
    `finalize_manifest` once all have finished.
    settings: JSON-able description of what produces the records (recorded in layout.json and the
      manifest); resuming with other settings raises `DataError` kind `settings_mismatch` before any
      record is made. resume_command: how to continue this corpus (shown in that error).
    check_audio: decode every clip before writing it; a clip that is undecodable, non-finite, empty,
      longer than `max_audio_seconds` or unlike its header skips its record (counted by kind).
    """
    out_dir = os.fspath(out_dir)
    if n_records <= 0 or records_per_shard <= 0:
        raise data_error("bad_config", f"n_records ({n_records}) and records_per_shard "
                                       f"({records_per_shard}) must be positive")
    if not 0 <= process_index < process_count:
        raise data_error("bad_config", f"process_index {process_index} not in [0, {process_count})")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise data_error("bad_config", f"{out_dir} exists and is not a directory; write the corpus elsewhere")
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-n_records // records_per_shard)
    _start_layout(out_dir, n_records, records_per_shard, settings, resume_command)
    counter, stats = BadDataCounter(), []
    for index in range(process_index, num_shards, process_count):
        name = shard_name(index, num_shards)
        done = _shard_done(out_dir, name, verify_existing)
        if done is None:
            span = range(index * records_per_shard, min((index + 1) * records_per_shard, n_records))
            done = _write_shard(out_dir, index, num_shards, span, record_fn, writer_options,
                                max_audio_seconds if check_audio else None)
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
    layout, problem = _load_json(os.path.join(out_dir, LAYOUT))
    if problem is not None or (layout is not None and not isinstance(layout, dict)):
        raise data_error("bad_layout", f"{os.path.join(out_dir, LAYOUT)} is damaged ({problem or 'not an object'}); "
                                       "the corpus's layout is unknown: write it again to a new directory")
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
    if "settings" in layout:
        manifest["settings"] = layout["settings"]
    _atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


# --- reading: manifest, shard paths, checksums ------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")
VERIFY_MODES = ("first_open", "size", "always")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _fix_shard(corpus_dir: str) -> str:
    return (f"rewrite it by rerunning the command that wrote {corpus_dir} with the same output directory and "
            "settings (finished shards are kept, damaged ones rewritten), or restore it from a copy; "
            f"`alm corpus verify {corpus_dir}` checks every shard")


def load_manifest(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    """The checked `manifest.json` of a finished corpus; `DataError` with a kind naming what is wrong:
    `missing_corpus` (no such directory), `incomplete_corpus` (no manifest: unfinished), `bad_manifest`
    (unreadable, not a corpus manifest, malformed or duplicate shard entries)."""
    corpus_dir = os.fspath(corpus_dir)
    if not os.path.exists(corpus_dir):
        raise data_error("missing_corpus", f"corpus directory {corpus_dir} does not exist; check the path (e.g. "
                                           "data.corpus), or write the corpus first (`alm generate --out DIR`)")
    if not os.path.isdir(corpus_dir):
        raise data_error("missing_corpus", f"corpus {corpus_dir} is not a directory; pass the directory that holds "
                                           f"{MANIFEST} and the shards")
    path = os.path.join(corpus_dir, MANIFEST)
    manifest, problem = _load_json(path)
    rebuild = f"rebuild it from the shards' .done.json files with `alm corpus finalize {corpus_dir}`"
    if manifest is None and problem is None:
        if os.path.exists(os.path.join(corpus_dir, LAYOUT)):
            raise data_error("incomplete_corpus", f"corpus {corpus_dir} is unfinished (no {MANIFEST}: its write "
                                                  "stopped before the end); rerun the command that writes it with "
                                                  "the same output directory (finished shards are kept), or, if "
                                                  f"every shard is written, {rebuild}")
        raise data_error("incomplete_corpus", f"{corpus_dir} is not a corpus: it has no {MANIFEST} (nor {LAYOUT}); "
                                              "pass a directory written by `alm generate` / write_corpus")
    if problem is not None:
        raise data_error("bad_manifest", f"{path} is damaged: {problem}; {rebuild}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise data_error("bad_manifest", f"{path} is not an alm_jax corpus manifest (format {fmt!r}, expected "
                                         f"{FORMAT!r}); {rebuild}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise data_error("bad_manifest", f"{path} has no 'shards' list; {rebuild}")
    names = set()
    for k, s in enumerate(shards):
        ok = (isinstance(s, dict) and isinstance(s.get("name"), str) and _is_count(s.get("count"))
              and _is_count(s.get("bytes")) and isinstance(s.get("sha256"), str) and _SHA256.fullmatch(s["sha256"]))
        if not ok:
            raise data_error("bad_manifest", f"{path}: shard entry {k} ({str(s)[:200]}) needs a name, a count, a "
                                             f"size in bytes and a sha256; {rebuild}")
        if s["name"] in names:
            raise data_error("bad_manifest", f"{path} lists shard {s['name']!r} twice; {rebuild}")
        names.add(s["name"])
    return manifest


def shard_path(corpus_dir: str | os.PathLike, name: Any) -> str:
    """`corpus_dir/name` for a shard file name from a manifest; `DataError` kind `path_traversal` for an
    absolute path, a path with directories (`../x`, `a/b`) or a symlink that leaves the corpus directory."""
    corpus_dir = os.fspath(corpus_dir)
    where = os.path.join(corpus_dir, MANIFEST)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise data_error("bad_manifest", f"{where}: shard name {name!r} is not a file name")
    if os.path.isabs(name) or "/" in name or "\\" in name or name in (".", ".."):
        raise data_error("path_traversal", f"{where}: shard {name!r} is not a file name inside {corpus_dir}; a "
                                           "corpus reads only its own shards (absolute paths and directories such "
                                           f"as '../' are refused): rebuild the manifest with `alm corpus finalize "
                                           f"{corpus_dir}`, or copy the shards into the corpus directory")
    real_dir = os.path.realpath(corpus_dir)
    real = os.path.realpath(os.path.join(real_dir, name))
    if os.path.dirname(real) != real_dir:
        raise data_error("path_traversal", f"{where}: shard {name!r} is a symlink to {real}, outside {corpus_dir}; "
                                           "a corpus reads only its own shards: copy the file into the directory")
    return os.path.join(corpus_dir, name)


def _shard_problem(corpus_dir: str, entry: dict[str, Any], path: str, marker: dict[str, Any],
                   mode: str) -> DataError | None:
    """Why shard `entry` (a manifest entry at `path`) cannot be read, or None; updates `marker` with the
    shards whose sha256 was checked now."""
    name = entry["name"]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return data_error("missing_shard", f"corpus {corpus_dir}: shard {name} is missing; {_fix_shard(corpus_dir)}")
    if st.st_size != entry["bytes"]:
        return data_error("corrupt_shard", f"corpus {corpus_dir}: shard {name} is {st.st_size} bytes, the manifest "
                                           f"records {entry['bytes']} (truncated or damaged); {_fix_shard(corpus_dir)}")
    if mode == "size":
        return None
    stamp = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
    if mode == "first_open" and marker.get(name) == stamp:
        return None
    digest = _sha256(path)
    if digest != entry["sha256"]:
        marker.pop(name, None)
        return data_error("corrupt_shard", f"corpus {corpus_dir}: shard {name} is damaged (its sha256 is "
                                           f"{digest[:16]}..., the manifest records {entry['sha256'][:16]}...); "
                                           f"{_fix_shard(corpus_dir)}")
    marker[name] = stamp
    return None


def _read_marker(corpus_dir: str) -> dict[str, Any]:
    marker = _read_json(os.path.join(corpus_dir, VERIFIED))
    return marker if isinstance(marker, dict) else {}


def _write_marker(corpus_dir: str, marker: dict[str, Any], before: dict[str, Any]) -> None:
    if marker == before:
        return
    path = os.path.join(corpus_dir, VERIFIED)
    try:
        _atomic_write_json(path, marker)
    except OSError as e:
        log.warning("cannot record the verified shards in %s (%s); their sha256 is checked again at the next "
                    "open", path, e)


def check_shards(corpus_dir: str | os.PathLike, manifest: dict[str, Any], mode: str = "first_open") -> list[str]:
    """The paths of a checked manifest's shards, each confined to `corpus_dir` and checked by `mode`:
    `size` (exists with the manifest's size), `first_open` (also its sha256, once: remembered in
    `.verified.json` by size and mtime) or `always` (sha256 every time). Raises `DataError` naming the
    first bad shard and the fix."""
    if mode not in VERIFY_MODES:
        raise data_error("bad_config", f"verify={mode!r}; use one of {VERIFY_MODES}")
    corpus_dir = os.fspath(corpus_dir)
    entries = manifest["shards"]
    paths = [shard_path(corpus_dir, s["name"]) for s in entries]
    before = _read_marker(corpus_dir) if mode != "size" else {}
    marker = {k: v for k, v in before.items() if k in {s["name"] for s in entries}}
    pending = [s["bytes"] for s in entries if mode != "size" and marker.get(s["name"], {}).get("sha256") != s["sha256"]]
    if sum(pending) > 1 << 30:
        log.info("checking the sha256 of %d shard(s) (%.1f GB) of %s; later opens skip the unchanged ones",
                 len(pending), sum(pending) / 1e9, corpus_dir)
    try:
        for entry, path in zip(entries, paths):
            problem = _shard_problem(corpus_dir, entry, path, marker, mode)
            if problem is not None:
                raise problem
    finally:
        _write_marker(corpus_dir, marker, before)
    return paths


def _shard_error(path: str, why: Any) -> DataError:
    corpus_dir = os.path.dirname(path) or "."
    return data_error("corrupt_shard", f"cannot read corpus shard {path}: {why}. The shard is damaged (or is not "
                                       f"the shard {MANIFEST} describes): {_fix_shard(corpus_dir)}; if the shard is "
                                       f"intact and {MANIFEST} is wrong, rebuild it with `alm corpus finalize "
                                       f"{corpus_dir}`")


def verify_corpus(corpus_dir: str | os.PathLike, *, records: bool = False,
                  max_audio_seconds: float = audio_io.DEFAULT_MAX_SECONDS) -> dict[str, Any]:
    """Check a finished corpus completely: the manifest, then every shard (path, size, sha256 recomputed,
    record count); with `records`, also parse every record and decode its audio. Returns `{"shards",
    "records", "problems": [message per bad shard], "bad": BadDataCounter dict of the records}`; raises
    `DataError` only when the manifest itself is unusable."""
    corpus_dir = os.fspath(corpus_dir)
    manifest = load_manifest(corpus_dir)
    before = _read_marker(corpus_dir)
    marker = dict(before)
    problems: list[str] = []
    bad = BadDataCounter()
    n_records = 0
    for entry in manifest["shards"]:
        try:
            path = shard_path(corpus_dir, entry["name"])
        except DataError as e:
            problems.append(str(e))
            continue
        problem = _shard_problem(corpus_dir, entry, path, marker, "always")
        if problem is None:
            src = ShardedArrayRecordSource([path], [entry["count"]])
            try:
                if entry["count"]:
                    src._reader(0)
                for i in range(entry["count"] if records else 0):
                    try:
                        rec = Record.from_bytes(src[i])
                        rec.check_audio(max_audio_seconds)
                    except (AudioError, DataError) as e:
                        if error_kind(e) == "corrupt_shard":
                            raise
                        bad.skip(error_kind(e), f"{entry['name']} record {i}: {e}")
                        continue
                    bad.ok()
                n_records += entry["count"]
            except DataError as e:
                problem = e
                marker.pop(entry["name"], None)
            finally:
                src.close()
        if problem is not None:
            problems.append(str(problem))
    _write_marker(corpus_dir, marker, before)
    return {"corpus": corpus_dir, "shards": len(manifest["shards"]), "records": n_records, "problems": problems,
            "bad": bad.to_dict()}


class ShardedArrayRecordSource:
    """Random access (`len`, `[i]`, `__getitems__`) over ArrayRecord shards whose record counts are
    known up front (from the manifest), so constructing it opens no file; each shard's reader opens on
    first access (and must hold the expected number of records). Thread-safe; picklable (readers reopen
    in the new process), so Grain workers can use it. A reader error raises `DataError` kind
    `corrupt_shard` naming the shard.

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

                    path = self.paths[shard]
                    try:
                        reader = ArrayRecordReader(path, self.reader_options, file_reader_buffer_size=32768)
                        n = reader.num_records()
                    except RuntimeError as e:
                        raise _shard_error(path, e) from None
                    if n != self.counts[shard]:
                        reader.close()
                        raise _shard_error(path, f"it holds {n} records, {MANIFEST} says {self.counts[shard]}")
                    self._readers[shard] = reader
        return reader

    def _read(self, shard: int, positions: list[int]) -> list[bytes]:
        try:
            return self._reader(shard).read(positions)
        except RuntimeError as e:
            raise _shard_error(self.paths[shard], e) from None

    def __getitem__(self, index: int) -> bytes:
        shard, pos = self._locate(index)
        return self._read(shard, [pos])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
        """Batch read, grouped by shard."""
        by_shard: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for k, index in enumerate(indices):
            shard, pos = self._locate(index)
            by_shard[shard].append((pos, k))
        out: list[bytes] = [b""] * len(indices)
        for shard, items in by_shard.items():
            for (_, k), data in zip(items, self._read(shard, [p for p, _ in items])):
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
    for Grain pipelines (`Record.from_bytes` decodes one). Opening reads `manifest.json`, checks it, and
    checks every shard (`check_shards` with `verify`: size always, sha256 on the first open by default);
    each shard's reader opens on first access. Every problem is a `DataError` naming the file and the fix.
    """

    def __init__(self, path: str | os.PathLike, reader_options: str = DEFAULT_READER_OPTIONS,
                 verify: str = "first_open"):
        self.path = os.fspath(path)
        self.manifest = manifest = load_manifest(self.path)
        paths = check_shards(self.path, manifest, verify)
        shards = [(p, s["count"]) for p, s in zip(paths, manifest["shards"]) if s["count"]]
        if not shards:
            raise data_error("empty_corpus", f"{self.path} holds no records")
        self.source = ShardedArrayRecordSource([p for p, _ in shards], [c for _, c in shards], reader_options)

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
