"""Probe: do a trained connector's audio tokens carry a clip's loudness and duration (multi_audio's louder / longer)?

    python benchmarks/level_probe.py runs/demo/checkpoints --step 200

`--clips` `DemoSource(seed=98)` clips (all kinds, 1-6 s) and each one's copy `--drop-db` quieter, as the
multi_audio suite's `louder` items make them. For the audio tokens `[clips, 16, 576]` and, beside them, Whisper's
last tapped block mean-pooled over the clip's frames:

- how much the quieter copy moves the tokens: RMS of (tokens(clip) - tokens(quieter copy)) next to the RMS of the
  clip-to-clip part (tokens minus their mean over clips);
- `louder` from one clip alone: a ridge readout (fitted on the first 3/4 of the clips, both versions, scored on the
  rest) of "original or quieter copy" -- chance 0.5;
- `louder` from a pair: the readout's score of the original above its quieter copy's, on the held-out clips;
- `longer`: a ridge regression of the clip's duration (seconds), held-out R^2 and the share of held-out clip pairs
  at least 1 s apart whose order the predicted durations get right.
"""

from __future__ import annotations

import argparse

import numpy as np
from audio_token_probe import tokens_and_pooled   # a sibling script: benchmarks/ is on sys.path when run


def clips(n: int, seconds: float = 6.0):
    """(audio `[n, S]` float32 zero-padded, valid samples `[n]`, durations s `[n]`)."""
    from alm_jax.data.sources.demo import DemoSource
    src = DemoSource(seed=98, n_clips=n, min_duration=1.0, max_duration=seconds)
    s = int(16000 * seconds)
    audio, samples, durations = np.zeros((n, s), np.float32), np.zeros(n, np.int32), np.zeros(n)
    for i in range(n):
        _, wave = src[i]
        samples[i] = min(len(wave), s)
        audio[i, :samples[i]] = wave[:s]
        durations[i] = samples[i] / 16000
    return audio, samples, durations


def ridge_fit(x: np.ndarray, t: np.ndarray, alpha: float = 10.0):
    """A ridge readout (standardized features, dual form) fitted on rows `x` -> a predictor of new rows."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = a.T @ np.linalg.solve(a @ a.T + alpha * np.eye(len(a)), t)
    return lambda z: np.c_[(z - mu) / sd, np.ones(len(z))] @ w


def readouts(feats: np.ndarray, quiet: np.ndarray, durations: np.ndarray) -> dict[str, float]:
    """Single-clip and pair louder accuracy, duration R^2 and pair order from features `[n, d]` and the quieter
    copies' features."""
    n = len(feats)
    cut = n * 3 // 4
    x = np.concatenate([feats[:cut], quiet[:cut]])
    loud = ridge_fit(x, np.r_[np.ones(cut), -np.ones(cut)])
    a, b = loud(feats[cut:]), loud(quiet[cut:])
    single = float(np.mean(np.r_[a > 0, b < 0]))
    pair = float(np.mean(a > b))
    dur = ridge_fit(feats[:cut], durations[:cut])(feats[cut:])
    true = durations[cut:]
    r2 = 1 - float(np.sum((dur - true) ** 2) / np.sum((true - true.mean()) ** 2))
    i, j = np.triu_indices(len(true), 1)
    apart = np.abs(true[i] - true[j]) >= 1.0
    order = float(np.mean(np.sign(dur[i] - dur[j])[apart] == np.sign(true[i] - true[j])[apart]))
    return {"single": single, "pair": pair, "r2": r2, "order": order}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", help="an `alm train` checkpoint.dir")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--clips", type=int, default=240)
    ap.add_argument("--drop-db", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    from alm_jax.export.source import load_run
    audio, samples, durations = clips(args.clips)
    model = load_run(args.checkpoints, args.step).model
    out = {name: tokens_and_pooled(model, audio * gain, samples, args.batch)
           for name, gain in (("original", 1.0), ("quieter", 10 ** (-args.drop_db / 20)))}
    out = {name: (tok.reshape(len(tok), -1), pooled) for name, (tok, pooled) in out.items()}
    rms = lambda v: float(np.sqrt(np.mean(v ** 2)))   # noqa: E731
    tok, tok_q = out["original"][0], out["quieter"][0]
    print(f"{args.clips} clips, copies {args.drop_db:g} dB quieter; audio tokens: clip-to-clip rms "
          f"{rms(tok - tok.mean(0)):.4f}, original - quieter rms {rms(tok - tok_q):.4f}")
    print("features | louder from one clip | louder from the pair | duration R^2 | duration order (pairs >= 1 s apart)")
    for k, label in ((0, "audio tokens"), (1, "Whisper last tap, pooled")):
        r = readouts(out["original"][k], out["quieter"][k], durations)
        print(f"{label} | {r['single']:.2f} | {r['pair']:.2f} | {r['r2']:.2f} | {r['order']:.2f}", flush=True)


if __name__ == "__main__":
    main()
