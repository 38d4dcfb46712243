"""Benchmark: how fast the demo source synthesizes clips, over 1 and N worker processes.

    python benchmarks/bench_demo_synth.py                     # 1,000 clips, 1 and 2 processes
    python benchmarks/bench_demo_synth.py --clips 200 --processes 4

Each worker builds its own `DemoSource(seed, n_clips)` and makes whole clips (waveform + ClipMeta), returning
only their kind and duration; wall time includes starting the workers. Prints clips/s, seconds of audio
per second, CPU time per clip (all processes; less sensitive than wall time to a busy machine) and one
markdown table row per run for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

_source = None


def _init_worker(seed: int, n_clips: int) -> None:
    global _source
    from alm_jax.data.sources.demo import DemoSource

    _source = DemoSource(seed=seed, n_clips=n_clips)


def _make_clip(index: int) -> tuple[str, float]:
    meta, _waveform = _source[index]
    return meta.extra["kind"], meta.duration


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (pool workers once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(clips: int, processes: int, seed: int, start_method: str) -> dict:
    """Synthesize `clips` clips over `processes` workers; returns timing and what was made."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if processes == 1:
        _init_worker(seed, clips)
        results = [_make_clip(i) for i in range(clips)]
    else:
        with mp.get_context(start_method).Pool(processes, _init_worker, (seed, clips)) as pool:
            results = pool.map(_make_clip, range(clips), chunksize=max(1, clips // (processes * 16)))
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return {"clips": clips, "processes": processes, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "audio_seconds": sum(d for _, d in results), "kinds": collections.Counter(k for k, _ in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-method", default="spawn", choices=mp.get_all_start_methods())
    args = parser.parse_args()

    from alm_jax.audio import synth

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {sys.version.split()[0]}; "
          f"{synth.speech_backend_description()}")
    rows = []
    for processes in args.processes:
        load = os.getloadavg()[0]
        r = run(args.clips, processes, args.seed, args.start_method) | {"load": load}
        rate = r["clips"] / r["seconds"]
        print(f"{r['clips']} clips, {processes} process(es): {r['seconds']:.1f} s, {rate:.1f} clips/s, "
              f"{r['audio_seconds'] / r['seconds']:.0f} s of audio/s, {1000 * r['cpu_seconds'] / r['clips']:.0f} ms "
              f"CPU/clip ({r['audio_seconds'] / 3600:.2f} h; {dict(sorted(r['kinds'].items()))}; "
              f"load average before {r['load']:.1f})")
        command = (f"python benchmarks/bench_demo_synth.py --clips {args.clips} --processes {processes}"
                   f" --start-method {args.start_method}")
        rows.append(f"| demo synth, {args.clips:,} clips (events/speech/mixture, 16 kHz) | `{command}` | "
                    f"{r['seconds']:.1f} s | {rate:.1f} clips/s, {r['audio_seconds'] / r['seconds']:.0f}x real time, "
                    f"{1000 * r['cpu_seconds'] / r['clips']:.0f} ms CPU/clip |")
    print("\n| benchmark | command | wall | result |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
