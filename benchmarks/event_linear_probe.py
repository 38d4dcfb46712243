"""Probe: do the frozen Whisper tiny.en states the demo connector reads already tell the sound events apart?

    python benchmarks/event_linear_probe.py --train-clips 640 --test-clips 200

The demo's Q-Former reads Whisper tiny.en's block outputs (taps: blocks 2 and 4). This fits a ridge-regression
readout (one-vs-rest, targets +-1 per event class) on each clip's pooled states — mean and std over its valid
frames of both taps, `[4 * 384]` — from `DemoSource(seed, kinds=("events",))` clips (2-6 s, 1-3 events over the
demo's backgrounds), and scores held-out clips of seed 1 (the evaluation suites' seed): the share whose
highest-scoring class is one of the clip's labels (the alignment suite's reading of "the main sound") and the
per-class present/absent accuracy. A high score means the information is there and linearly readable, so a
connector that fails to name events fails on optimization or data, not on the encoder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def pooled_states(encoder, source, n: int, taps: tuple[int, ...], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(features `[n, 2 * len(taps) * d]`, labels `[n, classes]` 0/1) of the first `n` clips of `source`."""
    import jax.numpy as jnp

    from alm_jax.audio import log_mel, synth
    from alm_jax.audio.features import encoder_frames
    classes = list(synth.EVENT_LABELS)
    feats, labels = [], []
    for start in range(0, n, batch):
        clips = [source[i] for i in range(start, min(n, start + batch))]
        audio = np.zeros((len(clips), max(len(w) for _, w in clips)), np.float32)
        for j, (_, w) in enumerate(clips):
            audio[j, :len(w)] = w
        out = encoder(log_mel(jnp.asarray(audio), n_mels=encoder.config.num_mel_bins, pad_to_seconds=None),
                      keep=[t - 1 for t in taps])
        states = [np.asarray(out.block_outputs[t - 1]) for t in taps]
        for j, (meta, w) in enumerate(clips):
            frames = max(1, int(encoder_frames(len(w))))
            feats.append(np.concatenate([s[j, :frames].mean(0) for s in states]
                                        + [s[j, :frames].std(0) for s in states]))
            labels.append([c in meta.labels for c in classes])
    return np.asarray(feats), np.asarray(labels, np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-clips", type=int, default=640)
    p.add_argument("--test-clips", type=int, default=200)
    p.add_argument("--train-seed", type=int, default=11)
    p.add_argument("--taps", type=int, nargs="+", default=[2, 4], help="Whisper blocks, 1-based (the demo's)")
    args = p.parse_args()

    from alm_jax import load_whisper_encoder
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.weights.demo_models import prepare_demo
    encoder = load_whisper_encoder(prepare_demo().whisper)
    sources = [DemoSource(seed=s, n_clips=n, kinds=("events",), min_duration=2.0, max_duration=6.0)
               for s, n in ((args.train_seed, args.train_clips), (1, args.test_clips))]
    t = time.time()
    (x_train, y_train), (x_test, y_test) = (pooled_states(encoder, s, len(s), tuple(args.taps)) for s in sources)
    seconds = time.time() - t
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    design = lambda x: np.c_[(x - mean) / std, np.ones(len(x))]  # noqa: E731
    a, b = design(x_train), design(x_test)
    print(f"| readout | train clips | test clips | top-1 is a label | per-class accuracy |  ({seconds:.0f} s of encoding)")
    print("|---|---|---|---|---|")
    for ridge in (1.0, 10.0, 100.0):
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ (2 * y_train - 1))
        scores = b @ w
        top1 = float(np.mean(y_test[np.arange(len(y_test)), scores.argmax(1)] > 0))
        print(f"| ridge {ridge:g} | {len(x_train)} | {len(x_test)} | {100 * top1:.1f}% | "
              f"{100 * float(np.mean((scores > 0) == (y_test > 0))):.1f}% |")
    print(f"| always the most frequent class | | | {100 * float(y_test.mean(0).max()):.1f}% | "
          f"{100 * float(np.mean(y_test == 0)):.1f}% (all absent) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
