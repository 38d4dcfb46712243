"""Our batched sampler vs `transformers` `generate`, same model, same prompts, same new-token count, same run.

    .venv/bin/python benchmarks/bench_sampler.py [--batch 16] [--new-tokens 64] [--repeats 3] [--sample]

SmolLM2-135M-Instruct (the demo backbone), float32, a batch of real DeSTA generation prompts left-padded to
one 64-token bucket, EOS disabled on both sides so every row makes exactly `--new-tokens` tokens. JAX:
`generation.sampler.generate` (prefill + while_loop, compile timed separately, then the median of
`--repeats`). torch: `model.generate(do_sample=False)` (or the same top-p sampling with `--sample`) with
its default threads and with torch.set_num_threads(2) (equal threads on this 2-core machine), median of
`--repeats`. Prints one markdown row (tokens/s both sides, the ratio, compile s per bucket).

`--compare-scan`: no torch; our sampler twice in one run, the LLM's layers scanned and unrolled
(`scan_layers`), same weights, prompts and sampling config: per mode the compile time (trace + lower, XLA
compile) and the steady-state tokens/s (wall and per CPU-second; the timed calls alternate between the modes),
the load average, and the share of equal tokens.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", action="store_true", help="temperature 0.7, top-p 0.9 instead of greedy")
    ap.add_argument("--compare-scan", action="store_true",
                    help="our sampler with scanned vs unrolled layers (compile time, speed) instead of torch")
    args = ap.parse_args(argv)
    if args.compare_scan:
        return compare_scan(args, argv)

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation import sampler
    from alm_jax.generation.engine import ResponseGenerator
    from alm_jax.recipes.desta import DestaRecipe
    from alm_jax.weights.demo_models import prepare_demo

    llm_dir = prepare_demo(verbose=False).llm
    gen = ResponseGenerator(llm_dir, batch_size=args.batch, max_new_tokens=args.new_tokens)
    gen.load()
    source = DemoSource(seed=0, n_clips=args.batch, kinds=("events",), max_duration=6.0)
    recipe = DestaRecipe(seed=0)
    prompts = [gen.prompt_ids(recipe.item_for(i, source).generation_messages) for i in range(args.batch)]
    width = gen.bucket_width(max(map(len, prompts)))
    ids = np.full((args.batch, width), gen.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    temp, top_p = (0.7, 0.9) if args.sample else (0.0, 1.0)
    cfg = sampler.SamplingConfig(max_new_tokens=args.new_tokens, temperature=temp, top_p=top_p)  # no EOS

    def ours():
        tokens, _ = sampler.generate(gen.model, ids, mask, cfg)
        return np.asarray(tokens)

    t0 = time.perf_counter()
    first = ours()
    compile_s = time.perf_counter() - t0
    assert (first != sampler.PAD).all(), "every row must make --new-tokens tokens"
    t_jax = _median_seconds(ours, args.repeats)

    hf = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    kw = dict(do_sample=args.sample, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              pad_token_id=gen.pad_id, eos_token_id=None)
    if args.sample:
        kw.update(temperature=temp, top_p=top_p, top_k=0)

    def theirs():
        with torch.no_grad():
            return hf.generate(input_ids=t_ids, attention_mask=t_mask, **kw)

    if not args.sample:   # same tokens: the two greedy decoders agree (float32)
        same = float((theirs()[:, width:].numpy() == first).mean())
    else:
        same = float("nan")
    default_threads = torch.get_num_threads()
    t_torch = _median_seconds(theirs, args.repeats)
    torch.set_num_threads(2)
    t_torch2 = _median_seconds(theirs, args.repeats)
    torch.set_num_threads(default_threads)

    tokens = args.batch * args.new_tokens
    dev = jax.devices()[0]
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_sampler.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    row = (f"| {'top-p sampling' if args.sample else 'greedy'}, SmolLM2-135M float32, batch {args.batch} x {width}-token "
           f"prompts, {args.new_tokens} new tokens | ours {tokens / t_jax:.0f} tokens/s (compile {compile_s:.1f} s per "
           f"bucket) | transformers generate {tokens / t_torch:.0f} tokens/s ({default_threads} threads), "
           f"{tokens / t_torch2:.0f} (2 threads) | **{t_torch2 / t_jax:.2f}x** at equal threads | same greedy tokens: "
           f"{same:.1%} | {dev.platform}, {os.cpu_count()} cores, load {load} | `{cmd}` |")
    print(row)
    return row


def compare_scan(args, argv) -> str:
    """Scanned vs unrolled layers under `sampler.generate` (see the module docstring)."""
    import dataclasses
    import functools

    import jax
    from flax import nnx

    from alm_jax.generation import sampler
    from alm_jax.generation.engine import ResponseGenerator
    from alm_jax.weights.demo_models import prepare_demo
    from bench_generation import _timed, demo_batch

    llm_dir = prepare_demo(verbose=False).llm
    temp, top_p = (0.7, 0.9) if args.sample else (0.0, 1.0)
    cfg = sampler.SamplingConfig(max_new_tokens=args.new_tokens, temperature=temp, top_p=top_p)  # no EOS
    modes = (True, False)
    run, stats = {}, {}
    for scan in modes:
        gen = ResponseGenerator(llm_dir, batch_size=args.batch, max_new_tokens=args.new_tokens, scan_layers=scan)
        gen.load()
        ids, mask = demo_batch(gen, args.batch)
        graphdef, state = nnx.split(gen.model)
        dyn = (state, ids, mask.astype(bool), np.full((args.batch,), args.new_tokens, np.int32),
               np.arange(args.batch, dtype=np.int32), jax.random.key(cfg.seed))
        t0 = time.perf_counter()
        lowered = sampler._generate.lower(graphdef, *dyn, cfg=dataclasses.replace(cfg, seed=0))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        stats[scan] = {"lower": t1 - t0, "compile": time.perf_counter() - t1, "wall": [], "cpu": []}
        run[scan] = functools.partial(lambda c, d: np.asarray(c(*d)[0]), compiled, dyn)
        run[scan]()                                  # warm
    for _ in range(args.repeats):
        for scan in modes:
            wall, cpu = _timed(run[scan])
            stats[scan]["wall"].append(wall)
            stats[scan]["cpu"].append(cpu)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    same = float((run[True]() == run[False]()).mean())
    tokens = args.batch * args.new_tokens
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_sampler.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    lines = [f"`sampler.generate` ({'top-p sampling' if args.sample else 'greedy'}), SmolLM2-135M float32, batch "
             f"{args.batch} x {ids.shape[1]}-token prompts, {args.new_tokens} new tokens, {jax.devices()[0].platform}, "
             f"{os.cpu_count()} cores, load average {load}; equal tokens scanned vs unrolled {same:.1%}; medians "
             f"of {args.repeats} interleaved calls. Command: `{cmd}`", "",
             "| layers | trace + lower | XLA compile | compile total | tokens/s (per CPU-s) |", "|---|---|---|---|---|"]
    total, speed = {}, {}
    for scan in modes:
        st = stats[scan]
        total[scan] = st["lower"] + st["compile"]
        wall, cpu = float(np.median(st["wall"])), float(np.median(st["cpu"]))
        speed[scan] = tokens / wall
        lines.append(f"| {'scanned' if scan else 'unrolled'} | {st['lower']:.1f} s | {st['compile']:.1f} s | "
                     f"{total[scan]:.1f} s | {tokens / wall:.0f} ({tokens / cpu:.0f}) |")
    lines.append(f"| unrolled / scanned | | | **{total[False] / total[True]:.1f}x** | "
                 f"{speed[False] / speed[True]:.2f}x |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
