"""Input-pipeline throughput on 10 s FLAC clips vs raw FLAC decode alone (issue 5b).

Builds a corpus of `--records` records (one 10 s, 16 kHz FLAC clip of tones + noise each, DeSTA-like
messages: system prompt, `<audio>` + instruction, a 40-80 word answer), tokenized with the real
SmolLM2-135M-Instruct tokenizer (`prepare_demo().llm`), then measures on one core:

(a) `decode_audio` alone on the corpus's clips: clips/s (the limit of this design);
(b) the whole pipeline (`make_dataset`: read record -> parse -> decode (no resampling: 16 kHz in and out)
    -> pad to 30 s (DeSTA-Whisper) -> tokenize with the chat template + 64-token placeholder span + loss
    mask -> skip-bad + batch), 0 workers and `--workers` worker processes;
(c) the same with `host_features=True` (80-bin log-mel computed on the host instead of on device).

Rates are per wall second and per CPU second (this process plus its worker processes, from psutil);
on a shared machine the per-CPU rate is the one to compare. Target: (b) with 0 workers >= 70% of (a).
(a) and (b) with 0 workers are measured in `--rounds` alternating rounds (each side `--min-time` / rounds
seconds, at least 1 s, per round); their rates are medians over the rounds and the ratio is the median of
the per-round ratios.

    .venv/bin/python benchmarks/bench_pipeline.py
    .venv/bin/python benchmarks/bench_pipeline.py --threads 0 --stages   # + CPU ms per sample by stage
    .venv/bin/python benchmarks/bench_pipeline.py --profile      # + cProfile of (b), 0 workers, 0 threads
    .venv/bin/python benchmarks/bench_pipeline.py --threads 16 --buffer 500   # Grain's own read defaults
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_corpus import _INSTRUCTIONS, _sentence_pool, time_decoding  # noqa: E402

from alm_jax.data.corpus import Corpus, write_corpus  # noqa: E402
from alm_jax.data.pipeline import (AudioSpec, PipelineConfig, SampleBuilder, ensure_absl_flags_parsed,  # noqa: E402
                                   make_dataset)
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Provenance, Record  # noqa: E402
from alm_jax.data.templates import ChatTokenizer  # noqa: E402
from alm_jax.models.connectors import TokenRule  # noqa: E402

SR = 16000
SYSTEM = "Focus on the audio clips and instructions."


def clip_wave(i: int, seconds: float) -> np.ndarray:
    """Speech-like test audio: a few harmonics with a slow envelope, plus noise (as `flac_decode_rate`)."""
    rng = np.random.default_rng(i)
    t = np.arange(int(seconds * SR)) / SR
    k = i % 32
    env = 0.5 * (1 + np.sin(2 * np.pi * (0.5 + 0.1 * k) * t))
    tone = sum(np.sin(2 * np.pi * (120 + 10 * k) * h * t) / h for h in range(1, 6))
    return (0.2 * env * tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def record_fn(seconds: float):
    pool = _sentence_pool(512)
    def make(i: int) -> Record:
        answer = " ".join(pool[(i * 7 + j) % len(pool)] for j in range(2))      # 2 sentences, ~60-90 words
        desc = f"[00:00-00:{int(seconds):02d}] {pool[(i * 13) % len(pool)][:80]} (Gender: Female, Emotion: Neutral)"
        return Record(clips=[AudioClip.from_wave(clip_wave(i, seconds), SR)],
                      messages=[{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": f"{AUDIO_PLACEHOLDER}\n{_INSTRUCTIONS[i % len(_INSTRUCTIONS)]}"},
                                {"role": "assistant", "content": answer}],
                      seed_descriptions=[desc], recipe="desta",
                      provenance=Provenance(source="bench", item_id=str(i), generator="SmolLM2-135M", seed=i))
    return make


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds of this process and all its (live) descendants."""
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def decode_rate(clips: list[bytes], min_time: float) -> dict:
    done, dt, cpu = time_decoding(clips, SR, min_time)
    return {"clips": done, "per_s": done / dt, "per_cpu_s": done / cpu}


def pipeline_rate(corpus: Corpus, builder: SampleBuilder, cfg: PipelineConfig, min_time: float,
                  warmup_batches: int = 3) -> dict:
    """Samples/s of the pipeline after `warmup_batches` (worker start-up excluded)."""
    it = iter(make_dataset([corpus.source], builder, cfg))
    for _ in range(warmup_batches):
        batch = next(it)
    proc = psutil.Process()
    done, t0, c0 = 0, time.perf_counter(), _cpu_seconds(proc)
    while time.perf_counter() - t0 < min_time:
        batch = next(it)
        done += batch["input_ids"].shape[0]
    dt, cpu = time.perf_counter() - t0, _cpu_seconds(proc) - c0
    out = {"samples": done, "per_s": done / dt, "per_cpu_s": done / cpu,
           "bad": it.bad.to_dict()["bad_total"], "batch_mb": sum(v.nbytes for v in batch.values()) / 2**20}
    del it
    return out


class _StageClock:
    """CPU seconds of the iterating thread by stage (`time.thread_time`), summed over calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def timed(self, stage: str, fn, *args):
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.thread_time() - t0


class _TimedSource:
    """A random-access source whose reads are timed as stage "read"."""

    def __init__(self, source, clock: _StageClock):
        self.source, self.clock = source, clock

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.clock.timed("read", self.source.__getitem__, i)


class _TimedTokenizer(ChatTokenizer):
    """`ChatTokenizer` whose `encode` is timed as stage "tokenize"."""

    def __init__(self, tok: ChatTokenizer, clock: _StageClock):
        self.__dict__.update(tok.__dict__)
        self.clock = clock

    def encode(self, messages, span_lengths):
        return self.clock.timed("tokenize", super().encode, messages, span_lengths)


class _TimedBuilder(SampleBuilder):
    """`SampleBuilder` timing a whole sample ("sample") and its audio part ("audio": decode, checks, packing)."""

    def __init__(self, builder: SampleBuilder, clock: _StageClock):
        self.__dict__.update(builder.__dict__)
        self.tok = _TimedTokenizer(builder.tok, clock)
        self.clock = clock

    def __call__(self, raw: bytes):
        return self.clock.timed("sample", super().__call__, raw)

    def _audio(self, record):
        return self.clock.timed("audio", super()._audio, record)


def stage_times(corpus: Corpus, builder: SampleBuilder, cfg: PipelineConfig, batches: int = 50) -> dict:
    """CPU ms per sample by stage of the pipeline with 0 workers and 0 read threads (all on this thread):
    read (ArrayRecord), parse + pad (record bytes -> Record; the padded token rows), audio (FLAC decode + checks),
    tokenize (chat template + tokenizer + spans + loss mask), and the rest (Grain's index shuffle and
    iteration, skip-bad, collate into the batch)."""
    clock = _StageClock()
    cfg = dataclasses.replace(cfg, read_threads=0, num_workers=0)
    it = iter(make_dataset([_TimedSource(corpus.source, clock)], _TimedBuilder(builder, clock), cfg))
    next(it)
    clock.seconds.clear()
    t0 = time.thread_time()
    for _ in range(batches):
        next(it)
    total, sec = time.thread_time() - t0, clock.seconds
    n = batches * cfg.batch_size
    ms = lambda x: round(1e3 * x / n, 3)  # noqa: E731
    return {"read": ms(sec["read"]), "parse + pad": ms(sec["sample"] - sec["audio"] - sec["tokenize"]),
            "audio": ms(sec["audio"]), "tokenize": ms(sec["tokenize"]),
            "rest": ms(total - sec["read"] - sec["sample"]), "total": ms(total)}


def profile_pipeline(corpus: Corpus, builder: SampleBuilder, cfg: PipelineConfig, batches: int = 30) -> str:
    it = iter(make_dataset([corpus.source], builder, cfg))
    next(it)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(it)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--pad", type=float, default=30.0, help="pad clips to this many seconds (DeSTA-Whisper: 30)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the second pipeline run")
    ap.add_argument("--threads", type=int, default=None, help="PipelineConfig.read_threads (default: its default)")
    ap.add_argument("--buffer", type=int, default=None, help="PipelineConfig.read_buffer (default: its default)")
    ap.add_argument("--min-time", type=float, default=6.0, help="seconds per measurement")
    ap.add_argument("--out", default=None, help="corpus dir (default: a temp dir, removed afterwards)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of (a) and (b) with 0 workers")
    ap.add_argument("--stages", action="store_true", help="print CPU ms per sample by stage (0 workers, 0 threads)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the 0-worker pipeline")
    args = ap.parse_args()
    cmd = ".venv/bin/python benchmarks/bench_pipeline.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ensure_absl_flags_parsed()

    from transformers import AutoTokenizer
    from alm_jax.weights.demo_models import prepare_demo
    tok = ChatTokenizer(AutoTokenizer.from_pretrained(prepare_demo().llm))

    work = args.out or tempfile.mkdtemp(prefix="bench_pipeline_")
    try:
        t0 = time.perf_counter()
        write_corpus(work, record_fn(args.seconds), args.records, 100)
        corpus = Corpus(work)
        write_s = time.perf_counter() - t0
        clips = [corpus[i].clips[0].data for i in range(len(corpus))]
        spec = AudioSpec(tokens_for_samples=TokenRule(fixed=64), pad_to_seconds=args.pad, max_seconds=args.pad)
        lengths = [len(tok.encode(corpus[i].messages, [64])) for i in range(min(50, len(corpus)))]
        info = {"records": len(corpus), "clip_seconds": args.seconds, "pad_to_seconds": args.pad,
                "flac_kb_per_clip": round(np.mean([len(c) for c in clips]) / 1024, 1),
                "tokens_per_sample_mean": round(float(np.mean(lengths)), 1), "write_s": round(write_s, 1),
                "batch": args.batch, "seq_len": args.seq_len,
                "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        print(json.dumps(info), flush=True)

        read = {k: v for k, v in (("read_threads", args.threads), ("read_buffer", args.buffer)) if v is not None}
        builder = SampleBuilder(tok, spec, args.seq_len, 1, n_mels=80)
        cfg = PipelineConfig(batch_size=args.batch, seq_len=args.seq_len, **read)
        results, ratios = alternating_rates(clips, corpus, builder, cfg, args.min_time, args.rounds)
        print(json.dumps({"decode": results["decode"], "pipeline, 0 workers": results["pipeline, 0 workers"],
                          "ratios per round": ratios}), flush=True)
        runs = [("pipeline, 0 workers", False, 0), (f"pipeline, {args.workers} workers", False, args.workers),
                ("pipeline + host log-mel, 0 workers", True, 0),
                (f"pipeline + host log-mel, {args.workers} workers", True, args.workers)]
        for name, host, workers in runs[1:]:
            builder = SampleBuilder(tok, spec, args.seq_len, 1, host_features=host, n_mels=80)
            cfg = PipelineConfig(batch_size=args.batch, seq_len=args.seq_len, num_workers=workers, **read)
            results[name] = pipeline_rate(corpus, builder, cfg, args.min_time)
            print(json.dumps({name: results[name]}), flush=True)
        if args.stages:
            stages = stage_times(corpus, SampleBuilder(tok, spec, args.seq_len, 1),
                                 PipelineConfig(batch_size=args.batch, seq_len=args.seq_len))
            print(json.dumps({"CPU ms per sample by stage": stages}), flush=True)
        if args.profile:
            print(profile_pipeline(corpus, SampleBuilder(tok, spec, args.seq_len, 1), PipelineConfig(
                batch_size=args.batch, seq_len=args.seq_len, read_threads=0)))  # all work on this thread
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    dec = results["decode"]
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average (1, 5, 15 min): {info['load_avg']} at start, {end_load} at the end; "
          f"{info['tokens_per_sample_mean']} tokens/sample, {info['flac_kb_per_clip']} KB FLAC/clip")
    print("| what | command | per s | per CPU-s | vs decode (per CPU-s) |")
    print("|---|---|---|---|---|")
    print(f"| FLAC decode alone, {args.seconds:g} s clips (clips) | `{cmd}` | {dec['per_s']:.0f} | "
          f"{dec['per_cpu_s']:.0f} | 100% |")
    for name, _, _ in runs:
        r = results[name]
        share = float(np.median(ratios)) if name == runs[0][0] else r["per_cpu_s"] / dec["per_cpu_s"]
        print(f"| {name} (samples) | `{cmd}` | {r['per_s']:.0f} | {r['per_cpu_s']:.0f} | {100 * share:.0f}% |")


def alternating_rates(clips: list[bytes], corpus: Corpus, builder: SampleBuilder, cfg: PipelineConfig,
                      min_time: float, rounds: int) -> tuple[dict, list[float]]:
    """(a) decode alone and (b) the pipeline with 0 workers, alternating for `rounds` rounds of
    `min_time / rounds` seconds each (at least 1 s): median rates of both, and (b)/(a) per CPU-s of every
    round (on a shared machine the two sides of a round see about the same load)."""
    per = max(min_time / max(rounds, 1), 1.0)
    cfg = dataclasses.replace(cfg, num_workers=0)
    decode, pipe = [], []
    for _ in range(max(rounds, 1)):
        decode.append(decode_rate(clips, per))
        pipe.append(pipeline_rate(corpus, builder, cfg, per))
    med = lambda rs: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}  # noqa: E731
    ratios = [round(p["per_cpu_s"] / d["per_cpu_s"], 3) for d, p in zip(decode, pipe)]
    return {"decode": med(decode), "pipeline, 0 workers": med(pipe)}, ratios


if __name__ == "__main__":
    main()
