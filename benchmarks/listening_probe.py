"""Probe: can the demo ALM learn to hear at all? Train it on yes/no answers read from the clips' metadata.

    python benchmarks/listening_probe.py --out runs/probe --steps 200 optim.lr=3e-4
    python benchmarks/listening_probe.py --out runs/probe_1e-3 --steps 120 optim.lr=1e-3

Self-generated targets can only teach what the backbone writes from a clip's description; SmolLM2-135M answers
the demo's present/absent questions at chance from text. This probe removes that ceiling: a corpus of
`DemoSource(seed)` clips whose answer is "Yes." or "No." from the metadata (the question of
`evaluation.hallucination.questions_for`: one present label, one absent label, alternating), trained with
`configs/demo.yaml` (extra dotted overrides after the flags), then `alm eval --suite hallucination` on the
held-out clips (seed 1). Prints one markdown row for BENCHMARKS.md: accuracy, yes-rate, the share of present
questions answered right for speech and for sound events, and the audio tokens' norm and cross-clip spread
(`std over clips / rms`: ~0 means every clip gets the same tokens, a soft prompt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


CAPTION_QUESTIONS = ("What can you hear in this audio?", "Describe the sounds in this clip.",
                     "Which sounds does this recording contain?", "What is happening in this audio?")


def write_metadata_corpus(out: Path, n: int, seed: int, target: str = "yes_no") -> None:
    """`n` clips of DemoSource(seed), one answer each from the metadata: `yes_no` (one present/absent question,
    "Yes." / "No.") or `caption` (a sound question, answered with the clip's templated caption)."""
    from alm_jax.data.corpus import write_corpus
    from alm_jax.data.records import AudioClip, Record
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.evaluation.hallucination import questions_for
    from alm_jax.recipes.base import TRAINING_SYSTEM_PROMPT, chat, training_audio
    from alm_jax.recipes.cooccurrence import Cooccurrence

    source = DemoSource(seed=seed, n_clips=n, min_duration=2.0, max_duration=6.0)
    rules = Cooccurrence.from_source(source)

    def record(i: int) -> Record | None:
        meta, wave = source[i]
        if target == "caption":
            messages = chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{CAPTION_QUESTIONS[i % len(CAPTION_QUESTIONS)]}")
            messages.append({"role": "assistant", "content": meta.caption})
            return Record(clips=[AudioClip.from_wave(wave, source.sample_rate, meta=meta)], messages=messages,
                          recipe="metadata_caption")
        questions = questions_for(meta, i, seed, rules)
        if questions is None:
            return None
        q = questions[i % 2]
        messages = chat(TRAINING_SYSTEM_PROMPT, f"{training_audio(1)}\n{q['question']}")
        messages.append({"role": "assistant", "content": "Yes." if q["expected"] == "yes" else "No."})
        return Record(clips=[AudioClip.from_wave(wave, source.sample_rate, meta=meta)], messages=messages,
                      recipe="metadata_yes_no")

    write_corpus(out, record, n, 128)


def token_spread(checkpoint: Path, clips: int = 16) -> tuple[float, float, float]:
    """(audio-token norm, LLM text-embedding norm, cross-clip std / rms) of the trained connector."""
    import jax.numpy as jnp

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.export.source import load_run
    model = load_run(checkpoint).model
    waves = [DemoSource(seed=1, n_clips=clips, min_duration=2.0, max_duration=6.0)[i][1] for i in range(clips)]
    audio = np.zeros((clips, max(len(w) for w in waves)), np.float32)
    for i, w in enumerate(waves):
        audio[i, :len(w)] = w
    tokens = np.asarray(model.audio_tokens(jnp.asarray(audio), jnp.asarray([len(w) for w in waves], jnp.int32)))
    table = np.asarray(model.llm.embed_tokens.embedding[...], np.float32)
    spread = tokens.std(axis=0).mean() / np.sqrt((tokens ** 2).mean())
    return float(np.linalg.norm(tokens, axis=-1).mean()), float(np.linalg.norm(table, axis=-1).mean()), float(spread)


def present_right(details_dir: Path) -> tuple[float, float]:
    """Shares (%) of present-label questions answered "yes": speech, sound events."""
    items = json.loads(next(details_dir.glob("*.json")).read_text())["items"]
    right = {True: [], False: []}
    for it in items:
        if it["expected"] == "yes":
            right[it["label"] == "speech"].append(it["read"] == "yes")
    return tuple(100.0 * float(np.mean(right[k])) if right[k] else float("nan") for k in (True, False))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--clips", type=int, default=1200, help="training clips (one question each)")
    p.add_argument("--seed", type=int, default=11, help="the training clips' source seed (the eval uses 1)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-clips", type=int, default=60)
    p.add_argument("--target", choices=("yes_no", "caption"), default="yes_no",
                   help="what the training answers are, from the metadata (see write_metadata_corpus)")
    p.add_argument("--alignment", action="store_true", help="also run the alignment suite on --eval-clips clips")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=3e-4")
    args = p.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    alm = [str(Path(sys.executable).with_name("alm"))]
    corpus, ckpt = out / "corpus", out / "checkpoints"
    t0 = time.time()
    if not (corpus / "manifest.json").exists():
        write_metadata_corpus(corpus, args.clips, args.seed, args.target)
    subprocess.run(alm + ["train", str(ROOT / "configs" / "demo.yaml"), f"data.corpus=[{corpus}]", "data.weights=[1]",
                          "data.max_text_tokens=88", f"steps={args.steps}", f"optim.total_steps={args.steps}",
                          f"checkpoint.dir={ckpt}", f"logging.dir={out / 'train'}", f"checkpoint.every={args.steps}",
                          "eval.every=0", "seed=0", "resume=auto", *args.overrides], check=True)
    t_train = time.time() - t0

    def suite(name: str, max_new_tokens: int) -> dict:
        """`alm eval` of the final checkpoint on `--eval-clips` clips of suite `name`; its metrics row."""
        subprocess.run(alm + ["eval", str(ckpt), "--suite", name, "--out", str(out / "eval"), "--batch-size", "16",
                              "--max-new-tokens", str(max_new_tokens), "--set",
                              f"eval.suites=[{{name: {name}, clips: {args.eval_clips}}}]"], check=True)
        return next(iter(json.loads((out / "eval" / f"{name}.json").read_text()).values()))

    row = suite("hallucination", 4)
    if args.alignment:
        aligned = suite("alignment", 16)
        print("alignment:", json.dumps({k.rsplit("/", 1)[-1]: v for k, v in aligned.items()}))
    speech, events = present_right(out / "eval" / "hallucination-details")
    norm, text_norm, spread = token_spread(ckpt)
    print(f"| {' '.join(args.overrides) or 'demo.yaml'} | {args.steps} | "
          f"{row['eval/hallucination/accuracy']:.1f} | {row['eval/hallucination/no_audio_accuracy']:.1f} | "
          f"{row['eval/hallucination/yes_rate']:.1f} | {speech:.0f} | {events:.0f} | {norm:.1f} / {text_norm:.2f} | "
          f"{spread:.4f} | {t_train / 60:.0f} min |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
