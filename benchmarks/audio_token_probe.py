"""Probe: what a trained connector hands the frozen LLM — a shared soft prompt, or tokens that differ by clip?

    python benchmarks/audio_token_probe.py runs/demo/checkpoints --steps 200 400

For each checkpoint step: the audio tokens `[clips, 16, 576]` of `--clips` single-event `DemoSource(seed=99)`
clips (one sound over a background, 2-6 s), split into the part shared by all clips (the mean over clips, per
token) and the clip-to-clip part (what is left), each as an RMS next to the RMS of SmolLM2's token embeddings;
and a ridge readout (one-vs-rest, fitted on the first 3/4 of the clips, scored on the rest) of the event class
from the flattened tokens, beside the same readout from Whisper's last tapped block, mean-pooled over the clip's
frames. A clip-to-clip part far below the text scale under a large shared part means the LLM is fed one soft prompt
whatever the clip, even when the readout shows the class is still in the tokens.
"""

from __future__ import annotations

import argparse

import numpy as np


def clips(n: int, seconds: float = 6.0):
    """(audio `[n, S]` float32 zero-padded, valid samples `[n]`, class index `[n]`, class names)."""
    from alm_jax.data.sources.demo import DemoSource
    src = DemoSource(seed=99, n_clips=n, kinds=["events"], max_events=1, max_duration=seconds)
    s = int(16000 * seconds)
    audio, samples, labels = np.zeros((n, s), np.float32), np.zeros(n, np.int32), []
    for i in range(n):
        meta, wave = src[i]
        samples[i] = min(len(wave), s)
        audio[i, :samples[i]] = wave[:s]
        labels.append(meta.events[0].label)
    names = sorted(set(labels))
    return audio, samples, np.array([names.index(x) for x in labels]), names


def ridge_accuracy(x: np.ndarray, y: np.ndarray, classes: int, alpha: float = 10.0) -> float:
    """Held-out top-1 accuracy of a one-vs-rest ridge readout (standardized features, the last quarter held out)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = len(x) * 3 // 4
    a, b = np.c_[x[:cut], np.ones(cut)], np.c_[x[cut:], np.ones(len(x) - cut)]
    t = np.eye(classes)[y[:cut]]
    w = a.T @ np.linalg.solve(a @ a.T + alpha * np.eye(cut), t)   # dual form: features >> clips
    return float(np.mean((b @ w).argmax(1) == y[cut:]))


def tokens_and_pooled(model, audio: np.ndarray, samples: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The audio tokens `[n, 16, llm_dim]` of clips `audio` `[n, S]` (valid `samples` `[n]`), and Whisper's last
    tapped block mean-pooled over each clip's frames `[n, d]`, `batch` clips at a time (Whisper runs once for both)."""
    import jax.numpy as jnp
    toks, pooled = [], []
    for s in range(0, len(audio), batch):
        a, n = jnp.asarray(audio[s:s + batch]), jnp.asarray(samples[s:s + batch])
        states = model.encoder_states(0, a, None, n)
        toks.append(np.asarray(model.connector([states], n), np.float64))
        last = np.asarray([x for x in states if x is not None][-1], np.float64)
        frames = np.ceil(samples[s:s + batch] / audio.shape[1] * last.shape[1])
        valid = (np.arange(last.shape[1])[None] < frames[:, None])[..., None]
        pooled.append((last * valid).sum(1) / valid.sum(1))
    return np.concatenate(toks), np.concatenate(pooled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", help="an `alm train` checkpoint.dir")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--clips", type=int, default=420)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    from alm_jax.export.source import load_run
    audio, samples, y, names = clips(args.clips)
    print(f"{args.clips} clips, {len(names)} classes; step | tokens: rms, shared part, clip-to-clip part | "
          "text embedding rms | ridge accuracy from tokens | from Whisper's last tap")
    for step in args.steps:
        model = load_run(args.checkpoints, step).model
        tok, pooled = tokens_and_pooled(model, audio, samples, args.batch)
        shared = tok.mean(0)
        table = np.asarray(model.llm.embed_tokens.embedding[...], np.float64)
        rms = lambda v: float(np.sqrt(np.mean(v ** 2)))   # noqa: E731
        print(f"{step} | {rms(tok):.3f}, {rms(shared):.3f}, {rms(tok - shared):.4f} | {rms(table):.4f} | "
              f"{ridge_accuracy(tok.reshape(len(tok), -1), y, len(names)):.2f} | "
              f"{ridge_accuracy(pooled, y, len(names)):.2f}", flush=True)


if __name__ == "__main__":
    main()
