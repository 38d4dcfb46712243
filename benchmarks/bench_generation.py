"""Time corpus generation with the real SmolLM2-135M-Instruct (the demo backbone) on this machine.

    .venv/bin/python benchmarks/bench_generation.py [--batch 16] [--new-tokens 64] [--records 32]

(a) `generate_greedy` on one batch of real DeSTA generation prompts (DemoSource events clips, left-padded
    to a 64-token bucket), EOS disabled so every row makes exactly `--new-tokens` tokens: compile time,
    prefill time (a 1-token call), and steady-state new tokens/s (median of `--repeats`).
(b) `generate_corpus` end to end (tokenize, generate with EOS, FLAC-encode, write shards) for `--records`
    records: records/s and generated tokens/s (tokens before EOS), compile excluded by a warm-up run.

Prints one markdown table row: setting, results, device, load average, command. On a shared machine
compare the CPU-seconds figures too.

`--compare-scan`: (a) only, twice in one run, the LLM's layers scanned and unrolled (`scan_layers`), same
weights and prompts: per mode the compile time of the generation program (prefill + decode loop: the first
call, minus one steady-state call), the steady-state new tokens/s, the load average when measured; then the
max |prefill logit diff| between the modes and the share of equal generated tokens.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
import time

import numpy as np


def _timed(fn) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-scan", action="store_true",
                    help="compile time and speed with scanned vs unrolled layers, instead of the engine run")
    args = ap.parse_args(argv)
    if args.compare_scan:
        return compare_scan(args, argv)

    import jax

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus
    from alm_jax.models.llm import generate_greedy
    from alm_jax.recipes.desta import DestaRecipe
    from alm_jax.weights.demo_models import prepare_demo

    llm_dir = prepare_demo(verbose=False).llm
    source = DemoSource(seed=0, n_clips=max(args.batch, args.records), kinds=("events",), max_duration=6.0)
    recipe = DestaRecipe(seed=0)
    gen = ResponseGenerator(llm_dir, batch_size=args.batch, max_new_tokens=args.new_tokens)
    t_load, _ = _timed(gen.load)

    # (a) one padded batch, fixed work
    prompts = [gen.prompt_ids(recipe.item_for(i, source).generation_messages) for i in range(args.batch)]
    width = gen.bucket_width(max(map(len, prompts)))
    ids = np.full((args.batch, width), gen.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1

    def decode(n):
        return lambda: np.asarray(generate_greedy(gen.model, ids, mask, n, None))

    t_compile, _ = _timed(decode(args.new_tokens))
    _timed(decode(1))  # compile the prefill-only shape
    t_prefill = float(np.median([_timed(decode(1))[0] for _ in range(args.repeats)]))
    runs = [_timed(decode(args.new_tokens)) for _ in range(args.repeats)]
    t_gen, cpu_gen = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
    tokens = args.batch * args.new_tokens
    step_ms = (t_gen - t_prefill) / max(1, args.new_tokens - 1) * 1e3

    # (b) end to end through the engine (warm-up corpus first so that its compiles are excluded)
    with tempfile.TemporaryDirectory() as tmp:
        generate_corpus(os.path.join(tmp, "warm"), source, recipe, gen, n_records=args.batch,
                        records_per_shard=args.batch)
        before = gen.tokens_generated
        t_e2e, cpu_e2e = _timed(lambda: generate_corpus(os.path.join(tmp, "c"), source, recipe, gen,
                                                        n_records=args.records, records_per_shard=args.batch))
        e2e_tokens = gen.tokens_generated - before

    dev = jax.devices()[0]
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_generation.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    row = (f"| generation, SmolLM2-135M-Instruct float32, batch {args.batch} x {width}-token prompts, "
           f"{args.new_tokens} new tokens | load {t_load:.1f} s, compile {t_compile:.1f} s | prefill "
           f"{t_prefill * 1e3:.0f} ms, decode {step_ms:.0f} ms/step, **{tokens / t_gen:.0f} new tokens/s** "
           f"({tokens / cpu_gen:.0f} per CPU-s) | engine end to end: {args.records} records in {t_e2e:.1f} s = "
           f"{args.records / t_e2e:.2f} records/s, {e2e_tokens / t_e2e:.0f} tokens/s ({e2e_tokens / cpu_e2e:.0f} "
           f"per CPU-s) | {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, load {load} | `{cmd}` |")
    print(row)
    return row


def demo_batch(gen, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) `[batch, bucket]`: real DeSTA generation prompts, left-padded to one bucket."""
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.recipes.desta import DestaRecipe
    source = DemoSource(seed=0, n_clips=batch, kinds=("events",), max_duration=6.0)
    recipe = DestaRecipe(seed=0)
    prompts = [gen.prompt_ids(recipe.item_for(i, source).generation_messages) for i in range(batch)]
    width = gen.bucket_width(max(map(len, prompts)))
    ids = np.full((batch, width), gen.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return ids, mask


def compare_scan(args, argv) -> str:
    """Scanned vs unrolled layers: generation compile time and speed (see the module docstring). Both models
    stay loaded and the timed calls alternate between them, so a change of machine load hits both alike."""
    import jax
    from flax import nnx

    from alm_jax.generation.engine import ResponseGenerator
    from alm_jax.models.llm import _generate_greedy
    from alm_jax.weights.demo_models import prepare_demo

    llm_dir = prepare_demo(verbose=False).llm
    modes = (True, False)
    run, stats, logits = {}, {}, {}
    for scan in modes:
        gen = ResponseGenerator(llm_dir, batch_size=args.batch, max_new_tokens=args.new_tokens, scan_layers=scan)
        gen.load()
        ids, mask = demo_batch(gen, args.batch)
        graphdef, state = nnx.split(gen.model)
        logits[scan] = np.asarray(jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, attention_mask=m))(
            state, ids, mask))
        for n in (args.new_tokens, 1):            # the full program, and prefill + one token
            t0 = time.perf_counter()
            lowered = _generate_greedy.lower(graphdef, state, ids, mask, max_new_tokens=n, eos_id=None)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            run[scan, n] = functools.partial(lambda c, st: np.asarray(c(st, ids, mask)), compiled, state)
            if n == args.new_tokens:
                stats[scan] = {"lower": t1 - t0, "compile": t2 - t1, "wall": [], "cpu": [], "prefill": []}
        run[scan, args.new_tokens]()              # warm
    for _ in range(args.repeats):                 # interleaved
        for scan in modes:
            wall, cpu = _timed(run[scan, args.new_tokens])
            stats[scan]["wall"].append(wall)
            stats[scan]["cpu"].append(cpu)
            stats[scan]["prefill"].append(_timed(run[scan, 1])[0])
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    tokens = args.batch * args.new_tokens
    diff = float(np.abs(logits[True] - logits[False])[mask.astype(bool)].max())
    same = float((run[True, args.new_tokens]() == run[False, args.new_tokens]()).mean())
    dev = jax.devices()[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_generation.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    lines = [f"Generation program (`generate_greedy`: prefill + decode loop), SmolLM2-135M-Instruct float32, batch "
             f"{args.batch} x {ids.shape[1]}-token prompts, {args.new_tokens} new tokens, {dev.platform}, "
             f"{os.cpu_count()} cores, load average {load}. Scanned vs unrolled: max |prefill logit diff| "
             f"{diff:.2e}, equal tokens {same:.1%}. Timed calls interleaved, medians of {args.repeats}. "
             f"Command: `{cmd}`", "",
             "| layers | trace + lower | XLA compile | compile total | prefill + 1 token | decode ms/step | "
             "new tokens/s (per CPU-s) |", "|---|---|---|---|---|---|---|"]
    total = {}
    for scan in modes:
        st = stats[scan]
        wall, cpu, prefill = (float(np.median(st[k])) for k in ("wall", "cpu", "prefill"))
        total[scan] = st["lower"] + st["compile"]
        step_ms = (wall - prefill) / max(1, args.new_tokens - 1) * 1e3
        st.update(wall_med=wall, step_ms=step_ms)
        lines.append(f"| {'scanned' if scan else 'unrolled'} | {st['lower']:.1f} s | {st['compile']:.1f} s | "
                     f"{total[scan]:.1f} s | {prefill:.2f} s | {step_ms:.0f} | {tokens / wall:.0f} "
                     f"({tokens / cpu:.0f}) |")
    s_, u_ = stats[True], stats[False]
    lines.append(f"| unrolled / scanned | | | **{total[False] / total[True]:.1f}x** | | "
                 f"{u_['step_ms'] / s_['step_ms']:.2f}x | {s_['wall_med'] / u_['wall_med']:.2f}x |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
