"""Probe: which answer tokens carry a trained ALM's loss, with the record's own audio and with another record's?

    python benchmarks/answer_token_losses.py runs/demo/checkpoints --step 400 --corpus runs/demo/corpus/desta

Scores the first `--batches` batches of 8 records of `--corpus` (unshuffled) with the checkpoint in eval mode, once
as is and once with every sample given the next sample's audio (`evaluation.loss.other_audio`, the listening
gap's swap), and prints the first `--show` answers token by token (`token:nats`) and the mean loss per answer
position for both. An ALM that listens has lower losses on the audio-dependent tokens (a sound's name, a yes/no)
with its own audio; the answer's frame costs the same either way.
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", help="an `alm train` checkpoint.dir")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--show", type=int, default=6)
    args = ap.parse_args()
    import jax.numpy as jnp
    import numpy as np
    import optax
    from transformers import AutoTokenizer

    from alm_jax.evaluation.loss import HeldOutLoss, other_audio
    from alm_jax.export.source import load_run
    from alm_jax.weights.alm_params import model_dir
    run = load_run(args.checkpoints, args.step)
    tok = AutoTokenizer.from_pretrained(model_dir(run.cfg.model.llm, "model.llm"))
    data = HeldOutLoss(run.cfg, [args.corpus], batches=args.batches, batch_size=8).data
    by_position = {"own": collections.defaultdict(list), "other": collections.defaultdict(list)}
    shown = 0
    it = data.iterator()
    try:
        for _ in range(args.batches):
            batch = {k: jnp.asarray(v) for k, v in next(it).items()}
            for which, b in (("own", batch), ("other", other_audio(batch))):
                ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(run.model(b), b["targets"]))
                mask, targets = np.asarray(b["loss_mask"]) > 0, np.asarray(b["targets"])
                for r in range(len(targets)):
                    idx = np.nonzero(mask[r])[0]
                    for j, i in enumerate(idx):
                        by_position[which][j].append(ce[r, i])
                    if which == "own" and shown < args.show:
                        print(" | ".join(f"{tok.decode([targets[r, i]])!r}:{ce[r, i]:.2f}" for i in idx))
                        shown += 1
    finally:
        it.close()
    print("answer position: mean nats with own audio / with the next record's audio (records)")
    for j in sorted(by_position["own"]):
        own, other = by_position["own"][j], by_position["other"][j]
        print(f"{j}: {np.mean(own):.2f} / {np.mean(other):.2f} ({len(own)})")


if __name__ == "__main__":
    main()
