"""Time `alm_jax.audio.log_mel` (jit, after warm-up) against `transformers.WhisperFeatureExtractor`.

    .venv/bin/python benchmarks/bench_log_mel.py [--batch 16] [--seconds 30] [--n-mels 80] [--repeats 10]

Prints one markdown table row: setting, JAX time, extractor time, speed-up, device, command.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import jax
import numpy as np

from _timing import median_seconds


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    from transformers import WhisperFeatureExtractor

    from alm_jax.audio import log_mel

    sr = 16000
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((args.batch, int(args.seconds * sr)))).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=args.n_mels, sampling_rate=sr)

    on_device = jax.device_put(audio)
    run_jax = lambda: log_mel(on_device, n_mels=args.n_mels).block_until_ready()  # noqa: E731
    run_hf = lambda: extractor(audio, sampling_rate=sr, return_tensors="np")  # noqa: E731
    ours, ref = np.asarray(run_jax()), run_hf()["input_features"]  # warm-up (compile) + agreement check
    diff = float(np.abs(ours - ref).max())
    t_jax, t_hf = median_seconds(run_jax, args.repeats), median_seconds(run_hf, args.repeats)

    dev = jax.devices()[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_log_mel.py", *(argv or sys.argv[1:])])
    row = (f"| log-mel {args.n_mels} bins, batch {args.batch} x {args.seconds:g} s | JAX jit {t_jax * 1e3:.1f} ms | "
           f"WhisperFeatureExtractor {t_hf * 1e3:.1f} ms | {t_hf / t_jax:.2f}x | max diff {diff:.1e} | "
           f"{dev.platform} ({dev.device_kind}) | `{cmd}` |")
    print(row)
    return row


if __name__ == "__main__":
    main()
