"""Peak host memory and time of `llm` export (LoRA merged) vs transformers' `save_pretrained`, same model, same
shard size, each in its own subprocess (so each peak is its own).

    .venv/bin/python benchmarks/bench_export.py [--llm DIR] [--shard 100MB] [--rank 8]

ours: `alm_jax.export.llm.write_llm` on the JAX SmolLM2-135M (float32, LoRA rank 8 on q/v with non-zero B),
which streams tensors one by one into size-capped shards; transformers: `AutoModelForCausalLM.from_pretrained`
+ `save_pretrained(max_shard_size=...)` (torch, float32). Reported per side: resident set size after loading,
peak RSS during the write (sampled every 5 ms; `ru_maxrss` as a cross-check), the write's extra peak over
the loaded model, and the write time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread between `start()` and `stop()`; `.peak` in bytes."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def side_ours(llm_dir: str, out: str, shard: int, rank: int) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.export.llm import write_llm
    from alm_jax.models.lora import apply_lora, lora_layers
    from alm_jax.weights.llm_params import load_llm
    llm = load_llm(llm_dir)
    apply_lora(llm, rank=rank, alpha=2.0 * rank, target_regex=r"(q_proj|v_proj)", rngs=nnx.Rngs(0))
    for _, layer in lora_layers(llm):
        layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 1e-3, jnp.float32))
    loaded = rss()
    t = time.perf_counter()
    with PeakRSS() as p:
        write_llm(llm, llm_dir, out, dtype="float32", max_shard_bytes=shard)
    return {"loaded": loaded, "peak": p.peak, "seconds": time.perf_counter() - t}


def side_hf(llm_dir: str, out: str, shard: int, rank: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    loaded = rss()
    t = time.perf_counter()
    with PeakRSS() as p:
        model.save_pretrained(out, max_shard_size=shard)
    return {"loaded": loaded, "peak": p.peak, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default=None, help="HF LLM directory (default: the demo SmolLM2)")
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from alm_jax.export.writer import parse_size
    shard = parse_size(args.shard)
    if args.side:
        fn = side_ours if args.side == "ours" else side_hf
        print(json.dumps(fn(args.llm, args.out, shard, args.rank)))
        return
    if args.llm is None:
        from alm_jax.weights.demo_models import resolve_model_path
        args.llm = resolve_model_path("demo:smollm2-135m-instruct")
    size = sum(p.stat().st_size for p in Path(args.llm).glob("*.safetensors"))
    rows = {}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "transformers"):
            r = subprocess.run([sys.executable, __file__, "--side", side, "--llm", args.llm, "--shard", args.shard,
                                "--rank", str(args.rank), "--out", f"{tmp}/{side}"], env=env, capture_output=True,
                               text=True, check=True)
            rows[side] = json.loads(r.stdout.strip().splitlines()[-1])
            rows[side]["written"] = sum(p.stat().st_size for p in Path(f"{tmp}/{side}").glob("*.safetensors"))
    mb = lambda b: b / 2 ** 20  # noqa: E731
    print(f"model {Path(args.llm).name}: {mb(size):.0f} MiB of safetensors; shard cap {args.shard}")
    print("| side | RSS after load | peak RSS while writing | extra peak over loaded | written | write time |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, r in rows.items():
        print(f"| {side} | {mb(r['loaded']):.0f} MiB | {mb(r['peak']):.0f} MiB | {mb(r['peak'] - r['loaded']):.0f} MiB "
              f"| {mb(r['written']):.0f} MiB | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
