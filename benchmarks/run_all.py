"""Run every CPU benchmark script in benchmarks/ (`bench_*.py`) one after another (`make bench`).

    .venv/bin/python benchmarks/run_all.py               # each script with its own defaults (long)
    .venv/bin/python benchmarks/run_all.py --quick       # each with its smallest settings (a smoke run)
    .venv/bin/python benchmarks/run_all.py --gpu         # also gpu_step.py (full shape: needs a big accelerator)
    .venv/bin/python benchmarks/run_all.py --quick --list  # only print what would run

Each script runs as a subprocess with this interpreter, from the repository root, its output passed
through, under a header naming it and its arguments; a footer gives its wall time. A failing script does
not stop the others; the exit status is 1 if any failed (they are listed at the end).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPU_SCRIPT = "gpu_step.py"

# --quick: the smallest settings of each script, read off its argparse (a script not listed here, e.g. a new
# one, runs with its defaults). Scripts that need the demo models (bench_generation, bench_pipeline) still
# load them.
QUICK: dict[str, list[str]] = {
    "bench_checkpoint.py": ["--mb", "16", "--saves", "3"],
    "bench_corpus.py": ["--n", "5000", "--small", "1000", "--records-per-shard", "1000"],
    "bench_demo_synth.py": ["--clips", "50"],
    "bench_export.py": ["--shard", "50MB", "--rank", "2"],
    "bench_encoders.py": ["--w2v-layers", "1", "--clap-depths", "1,1,1,1", "--repeats", "1", "--threads", "default", "--context", "8"],
    "bench_generation.py": ["--batch", "2", "--new-tokens", "8", "--records", "4", "--repeats", "1"],
    "bench_llm_forward.py": ["--hidden", "64", "--layers", "1", "--batch", "1", "--seq", "16", "--vocab", "512",
                             "--repeats", "3"],
    "bench_log_mel.py": ["--batch", "2", "--seconds", "5", "--repeats", "3"],
    "bench_sampler.py": ["--batch", "2", "--new-tokens", "8", "--repeats", "1"],
    "bench_pipeline.py": ["--records", "16", "--seconds", "2", "--batch", "4", "--workers", "1", "--min-time", "1"],
    "bench_train_step.py": ["--batch", "1", "--text", "32", "--queries", "4", "--llm-layers", "1", "--vocab", "512",
                            "--repeats", "2", "--torch-threads", "default"],
    GPU_SCRIPT: ["--tiny", "--steps", "2"],
}


def plan(quick: bool, gpu: bool) -> list[tuple[str, list[str]]]:
    """(script name, arguments) for each benchmark to run, in order."""
    names = sorted(p.name for p in HERE.glob("bench_*.py"))
    if gpu:
        names.append(GPU_SCRIPT)
    return [(name, list(QUICK.get(name, [])) if quick else []) for name in names]


def _command(name: str, args: list[str]) -> list[str]:
    return [sys.executable, str(HERE / name), *args]


def _shown(name: str, args: list[str]) -> str:
    return shlex.join([sys.executable, f"benchmarks/{name}", *args])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass each script its smallest settings (see QUICK)")
    ap.add_argument("--gpu", action="store_true", help=f"also run {GPU_SCRIPT} (skipped by default)")
    ap.add_argument("--list", action="store_true", help="print the commands that would run, run nothing")
    args = ap.parse_args(argv)

    runs = plan(args.quick, args.gpu)
    if args.list:
        for name, script_args in runs:
            print(_shown(name, script_args))
        return 0

    results: list[tuple[str, int, float]] = []
    for i, (name, script_args) in enumerate(runs, 1):
        print(f"\n{'=' * 100}\n[{i}/{len(runs)}] {name}: {_shown(name, script_args)}\n{'=' * 100}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(_command(name, script_args), cwd=ROOT).returncode
        seconds = time.perf_counter() - t0
        results.append((name, rc, seconds))
        print(f"--- {name}: {'ok' if rc == 0 else f'FAILED (exit status {rc})'}, wall time {seconds:.1f} s",
              flush=True)

    failed = [(name, rc) for name, rc, _ in results if rc != 0]
    total = sum(s for _, _, s in results)
    print(f"\n{len(results) - len(failed)}/{len(results)} benchmarks ok, total wall time {total:.1f} s")
    for name, rc, seconds in results:
        print(f"  {'ok    ' if rc == 0 else 'FAILED'} {seconds:8.1f} s  {name}")
    if failed:
        print("failed: " + ", ".join(f"{name} (exit status {rc})" for name, rc in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
