"""Corpus benchmarks.

(a) Write a metadata-only corpus (no audio, ~300-byte chat messages per record): write rate, size on
    disk, time to open + read a first batch of 32 random records for a small vs the full corpus (each in
    a fresh process, imports excluded), peak RSS.
(b) Raw FLAC decode rate of 10 s clips with `decode_audio` at 16 kHz on one core (`flac_decode_rate`),
    the upper bound for the input pipeline.

Rates are given per wall-clock second and per CPU second of this process (`*_per_cpu_s`); on a shared
machine the CPU-time rate is the one to compare.

    .venv/bin/python benchmarks/bench_corpus.py                  # 200k records
    .venv/bin/python benchmarks/bench_corpus.py --n 5000000      # the full-size run (several minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from alm_jax.audio.io import decode_audio, encode_audio
from alm_jax.data.corpus import DEFAULT_WRITER_OPTIONS, Corpus, write_corpus
from alm_jax.data.records import Provenance, Record

_WORDS = ("the a speaker voice sounds calm bright low high woman man child dog barks music plays softly "
          "loudly in a quiet room street noise behind while someone talks about weather travel food "
          "and then pauses briefly before laughing clearly with an accent from the north").split()
_INSTRUCTIONS = ["Describe the audio in detail.", "What can you hear?", "Summarize what the speaker says.",
                 "What is the emotion of the speaker?", "List the sound events in order."]


def _sentence_pool(n: int = 4096, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(30, 45)))).capitalize() + "."
            for _ in range(n)]


def metadata_record_fn(pool: list[str]):
    """record_fn(i): a metadata-only record with ~300 bytes of messages, deterministic in i."""
    def record_fn(i: int) -> Record:
        answer = pool[(i * 2654435761) % len(pool)]
        return Record(
            clips=[],
            messages=[{"role": "user", "content": _INSTRUCTIONS[i % len(_INSTRUCTIONS)]},
                      {"role": "assistant", "content": answer}],
            seed_descriptions=[f"[00:00-00:{i % 30:02d}] placeholder transcript {i}"],
            recipe=("desta", "balsa", "alarm")[i % 3],
            provenance=Provenance(source="bench", item_id=str(i), generator="SmolLM2-135M", seed=i))
    return record_fn


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_bench(out_dir: str, n: int, records_per_shard: int,
                writer_options: str = DEFAULT_WRITER_OPTIONS) -> dict:
    """Write an n-record metadata-only corpus; write rate, size, peak RSS of this process."""
    shutil.rmtree(out_dir, ignore_errors=True)
    record_fn = metadata_record_fn(_sentence_pool())
    t, cpu = time.perf_counter(), time.process_time()
    write_corpus(out_dir, record_fn, n, records_per_shard, writer_options=writer_options)
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    size = _dir_bytes(out_dir)
    return {"records": n, "records_per_shard": records_per_shard, "writer_options": writer_options,
            "write_s": round(dt, 2), "write_cpu_s": round(cpu, 2),
            "write_records_per_s": round(n / dt), "write_records_per_cpu_s": round(n / cpu),
            "bytes_on_disk": size,
            "bytes_per_record": round(size / n, 1), "msg_bytes_per_record": round(
                np.mean([len(json.dumps(record_fn(i).messages)) for i in range(1000)]), 1),
            "peak_rss_mb_after_write": round(_peak_rss_mb(), 1)}


def open_bench(corpus_dir: str, batch: int = 32, seed: int = 0) -> dict:
    """Time to open a corpus and read + decode one batch of random records (in this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    c = Corpus(corpus_dir)
    t1, c1 = time.perf_counter(), time.process_time()
    idx = np.random.default_rng(seed).integers(0, len(c), size=batch).tolist()
    recs = c.__getitems__(idx)
    t2, c2 = time.perf_counter(), time.process_time()
    assert [r.provenance.item_id for r in recs] == [str(i) for i in idx]
    shards_touched = len({c.source._locate(i)[0] for i in idx})
    return {"records": len(c), "shards": len(c.manifest["shards"]), "open_ms": round((t1 - t0) * 1e3, 2),
            "open_cpu_ms": round((c1 - c0) * 1e3, 2), "first_batch_ms": round((t2 - t1) * 1e3, 2),
            "first_batch_cpu_ms": round((c2 - c1) * 1e3, 2), "shards_touched": shards_touched,
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def open_bench_fresh_process(corpus_dir: str, repeats: int = 5) -> dict:
    """`open_bench` in `repeats` new interpreters (imports done before timing starts); the medians,
    with a different random batch each time."""
    runs = []
    for seed in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--open-only", corpus_dir, "--seed", str(seed)],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    keys = ("open_ms", "open_cpu_ms", "first_batch_ms", "first_batch_cpu_ms", "shards_touched", "peak_rss_mb")
    med = {k: float(np.median([r[k] for r in runs])) for k in keys}
    return {"records": runs[0]["records"], "shards": runs[0]["shards"], "repeats": repeats, **med,
            "first_batch_ms_all": [r["first_batch_ms"] for r in runs]}


def time_decoding(clips: list[bytes], target_sr: int, min_time: float) -> tuple[int, float, float]:
    """Decodes `clips` (after one warm-up decode) round after round for at least `min_time` seconds;
    returns (clips decoded, wall seconds, CPU seconds)."""
    decode_audio(clips[0], target_sr=target_sr)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < min_time:
        for data in clips:
            decode_audio(data, target_sr=target_sr)
        done += len(clips)
    return done, time.perf_counter() - start, time.process_time() - cpu


def flac_decode_rate(seconds: float = 10.0, source_sr: int = 16000, target_sr: int = 16000,
                     n_clips: int = 32, min_time: float = 3.0) -> dict:
    """Decode rate (clips/s, one core) of `decode_audio` on `seconds`-long FLAC clips."""
    rng = np.random.default_rng(0)
    n = int(seconds * source_sr)
    t = np.arange(n) / source_sr
    clips = []
    for k in range(n_clips):  # speech-like: a few harmonics with a slow envelope, plus noise
        env = 0.5 * (1 + np.sin(2 * np.pi * (0.5 + 0.1 * k) * t))
        tone = sum(np.sin(2 * np.pi * (120 + 10 * k) * h * t) / h for h in range(1, 6))
        clips.append(encode_audio((0.2 * env * tone + 0.01 * rng.standard_normal(n)).astype(np.float32),
                                  source_sr, "flac"))
    done, dt, cpu = time_decoding(clips, target_sr, min_time)
    return {"clip_seconds": seconds, "source_sr": source_sr, "target_sr": target_sr,
            "flac_kb_per_clip": round(np.mean([len(c) for c in clips]) / 1024, 1),
            "decode_clips_per_s": round(done / dt, 1), "decode_clips_per_cpu_s": round(done / cpu, 1),
            "audio_seconds_per_cpu_s": round(done * seconds / cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="records in the large corpus")
    ap.add_argument("--small", type=int, default=50_000, help="records in the small corpus")
    ap.add_argument("--records-per-shard", type=int, default=10_000)
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora")
    ap.add_argument("--writer-options", default=DEFAULT_WRITER_OPTIONS)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-write", action="store_true", help="reuse the corpora already in --out")
    ap.add_argument("--open-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_only:
        print(json.dumps(open_bench(args.open_only, seed=args.seed)))
        return
    work = args.out or tempfile.mkdtemp(prefix="bench_corpus_")
    results: dict = {}
    try:
        small, large = os.path.join(work, f"corpus_{args.small}"), os.path.join(work, f"corpus_{args.n}")
        if not args.skip_write:
            results["write_small"] = write_bench(small, args.small, args.records_per_shard, args.writer_options)
            results["write_large"] = write_bench(large, args.n, args.records_per_shard, args.writer_options)
            print(json.dumps(results["write_large"]), flush=True)
        results["open_small"] = open_bench_fresh_process(small)
        results["open_large"] = open_bench_fresh_process(large)
        print(json.dumps({"open_small": results["open_small"], "open_large": results["open_large"]}), flush=True)
        if not args.skip_decode:
            results["flac_decode_16k"] = flac_decode_rate()
            results["flac_decode_44k_to_16k"] = flac_decode_rate(source_sr=44100, n_clips=8)
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
