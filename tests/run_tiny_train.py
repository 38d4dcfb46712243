"""Runs the tiny training setup in its own process (for kill -9 / SIGTERM / multi-device / multi-process tests).

usage: run_tiny_train.py PATHS_JSON RUN_DIR OUT_JSON [kill:N | term:N | none] [options] [overrides...]
options:
  --distributed      join a jax.distributed cluster first (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
                     JAX_PROCESS_ID in the environment; see alm_jax/distributed.py)
  --data-shards=S    train(data_shards=S): the global batch is built from S data shards
  --poison=A[-B]     make the audio of steps A..B all NaN (through train()'s batch_transform hook)
  --record-rows      record a fingerprint of every local row of every batch (its sample and its global
                     audio slots)
Writes {"losses": {step: loss}, "step", "stopped_by", "eval_losses", "rows": {step: [fingerprint, ...]},
"process_index", "process_count", "flops_per_step", "error"} to OUT_JSON. A DataError (the non-finite stop)
is written as "error" and exits with status 3.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def fingerprint(batch, row: int) -> str:
    """Identity of row `row` of a batch: its tokens, its audio clips, and which of its clips' tokens sit
    where (row-local indices)."""
    audio = batch["audio"] if "audio" in batch else batch["audio_features"]
    clips = audio.shape[0] // batch["input_ids"].shape[0]
    h = hashlib.sha1(batch["input_ids"][row].tobytes())
    h.update(audio[row * clips:(row + 1) * clips].tobytes())
    h.update(batch["audio_clip"][row].tobytes())
    h.update(batch["audio_pos"][row].tobytes())
    return h.hexdigest()[:16]


def main():
    paths, run_dir, out, action, *rest = sys.argv[1:]
    opts = {a[2:].partition("=")[0]: a.partition("=")[2] for a in rest if a.startswith("--")}
    overrides = [a for a in rest if not a.startswith("--")]
    if "distributed" in opts:   # before anything touches a JAX device
        from alm_jax.distributed import initialize_distributed
        initialize_distributed("auto")

    import jax
    import numpy as np

    from alm_jax.errors import DataError
    from alm_jax.evaluation import build_evaluators
    from alm_jax.training.trainer import train
    from tiny_setup import tiny_config

    cfg = tiny_config(json.loads(Path(paths).read_text()), Path(run_dir), *overrides)
    kind, _, at = action.partition(":")
    poison = range(0)
    if opts.get("poison"):
        a, _, b = opts["poison"].partition("-")
        poison = range(int(a), int(b or a) + 1)
    result = {"losses": {}, "eval_losses": {}, "rows": {}, "step": 0, "stopped_by": "running",
              "process_index": jax.process_index(), "process_count": jax.process_count(), "error": None,
              "flops_per_step": None}

    def write():
        Path(out).write_text(json.dumps(result))

    def on_step(step, m):
        result["losses"][step] = m["loss"]
        if "eval/loss" in m:
            result["eval_losses"][step] = m["eval/loss"]
        result["step"] = step
        write()
        if kind == "kill" and step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "term" and step == int(at) - 1:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives during the next step

    def transform(step, batch):
        if "record-rows" in opts:
            result["rows"][step] = [fingerprint(batch, r) for r in range(batch["input_ids"].shape[0])]
        if step in poison:
            key = "audio" if "audio" in batch else "audio_features"
            batch = dict(batch, **{key: np.full_like(batch[key], np.nan)})
        return batch

    shards = int(opts["data-shards"]) if opts.get("data-shards") else None
    try:
        r = train(cfg, evaluators=build_evaluators(cfg, data_shards=shards), on_step=on_step,
                  batch_transform=transform, data_shards=shards)
    except DataError as e:
        result.update(error=str(e), stopped_by="nonfinite")
        write()
        sys.exit(3)
    result.update(losses={int(k): v for k, v in r.losses.items()}, step=r.step, stopped_by=r.stopped_by,
                  eval_losses=r.eval_losses, flops_per_step=r.flops_per_step)
    write()


if __name__ == "__main__":
    main()
