"""Time `alm_jax.audio.log_mel` (jit, after warm-up) against `transformers.WhisperFeatureExtractor`.

    .venv/bin/python benchmarks/bench_log_mel.py [--batch 16] [--seconds 30] [--n-mels 80] [--rounds 5] [--repeats 5]

Both sides run in the same process, alternating: `--rounds` rounds of `--repeats` calls each; a side's time is
the median over all its calls, and the speed-up is the median of the per-round ratios (on a shared machine
a round's two sides see the same load). The extractor computes with torch when torch is installed (as here:
`torch.stft`, float32, torch's threads), else with numpy; the row names the path it took.

Prints the load average before and after, then one markdown table row: setting, JAX time, extractor time,
speed-up, max abs difference, device, command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import numpy as np

from _timing import median_seconds


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="calls per side per round")
    args = ap.parse_args(argv)

    from transformers import WhisperFeatureExtractor
    from transformers.utils import is_torch_available

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

    print(f"load average before: {load_average()}", flush=True)
    t_jax, t_hf = [], []
    for _ in range(args.rounds):
        t_jax.append(median_seconds(run_jax, args.repeats))
        t_hf.append(median_seconds(run_hf, args.repeats))
    print(f"load average after:  {load_average()}")
    print("per round (ms): JAX " + ", ".join(f"{t * 1e3:.1f}" for t in t_jax)
          + " | extractor " + ", ".join(f"{t * 1e3:.1f}" for t in t_hf))
    speedup = float(np.median(np.asarray(t_hf) / np.asarray(t_jax)))

    dev = jax.devices()[0]
    path = "torch" if is_torch_available() else "numpy"
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_log_mel.py", *(argv or sys.argv[1:])])
    row = (f"| log-mel {args.n_mels} bins, batch {args.batch} x {args.seconds:g} s | "
           f"JAX jit {np.median(t_jax) * 1e3:.1f} ms | "
           f"WhisperFeatureExtractor ({path}) {np.median(t_hf) * 1e3:.1f} ms | {speedup:.2f}x | "
           f"max diff {diff:.1e} | {dev.platform} ({dev.device_kind}) | `{cmd}` |")
    print(row)
    return row


if __name__ == "__main__":
    main()
