"""Where the JAX train step of `bench_train_step.py` spends its time: a `jax.profiler` trace of a few steps,
each XLA op's device time attributed to the model part named in its op_name (`jax.named_scope`: encoder0,
connector, llm, loss_head; the rest is the optimizer and glue), split into forward and backward.

    .venv/bin/python benchmarks/profile_train_step.py [--steps 3] [--remat none] [--unrolled] [--top 12]

Prints a markdown table (ms per step by part and direction, share of the summed op time) and the slowest
ops with their shapes. The op times are summed over XLA:CPU's thunks, so on 2 cores they add up to about the
step's wall time (ops do not overlap much). The trace is written under a temporary directory (perfetto JSON).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bench  # noqa: E402

PARTS = ("encoder0", "connector", "llm", "loss_head")


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, op_name metadata) of a compiled module's text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([^\n]*)$", hlo_text, re.M):
        meta = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
    return out


def part_of(op_name: str) -> str:
    direction = "backward" if "transpose(" in op_name else "forward"
    for part in PARTS:
        if re.search(rf"(^|[/(]){part}([/)]|$)", op_name):     # a scope shows as /part/ or jvp(part)
            return f"{part} {direction}"
    return f"other {direction}"   # optimizer, clipping, log-mel, splicing


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    ap.add_argument("--unrolled", action="store_true", help="model.scan_layers=false")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    import jax

    from alm_jax.config import OptimConfig
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.step import TrainState, alm_loss, build_train_step, make_optimizer, make_schedule

    cfg = argparse.Namespace(batch=2, text=128, queries=64, llm_layers=30, vocab=49152)
    whisper, connector, llm = bench.build_torch(cfg)
    batch = jax.device_put(bench.make_batch(cfg.batch, cfg.text, cfg.queries, cfg.vocab))
    with tempfile.TemporaryDirectory() as tmp:
        model = bench.build_jax(whisper, connector, llm, cfg, tmp, scan_layers=not args.unrolled, remat=args.remat)
    ocfg = OptimConfig(lr=1e-4, b1=0.9, b2=0.98, weight_decay=0.01, warmup_steps=0, total_steps=1000, clip_norm=1.0)
    graphdef, trainable, frozen = split_trainable(model)
    tx = make_optimizer(ocfg)
    state = TrainState(trainable, jax.jit(tx.init)(trainable))
    compiled = build_train_step(graphdef, tx, alm_loss, schedule=make_schedule(ocfg)).lower(
        state, frozen, batch, 0).compile()
    ops = op_table(compiled.as_text())
    for i in range(2):                                        # warm-up
        state, m = compiled(state, frozen, batch, i)
        float(m["loss"])
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for i in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, frozen, batch, 2 + i)
            float(m["loss"])
            walls.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_part, by_op, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # control-flow thunks (while/call/cond) contain their body's ops: count only the leaves
        if e.get("ph") != "X" or name not in ops or name.startswith(("while", "call", "cond")):
            continue
        shape, op_name = ops[name]
        ms = e["dur"] / 1e3 / args.steps
        by_part[part_of(op_name)] += ms
        by_op[(name, shape, part_of(op_name))] += ms
        calls[(name, shape, part_of(op_name))] += 1 / args.steps
    total = sum(by_part.values())
    dev = jax.devices()[0]
    lines = [f"Train step profile (`bench_train_step.py` shapes, {'unrolled' if args.unrolled else 'scanned'} "
             f"layers, remat {args.remat}), {dev.platform}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f}: step wall {np.median(walls) * 1e3:.0f} ms (median of {args.steps}), "
             f"summed op time {total:.0f} ms per step. Command: `.venv/bin/python benchmarks/profile_train_step.py"
             f"{' ' + ' '.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`", "",
             "| part | ms per step | share |", "|---|---:|---:|"]
    for part, ms in sorted(by_part.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {ms:.0f} | {100 * ms / total:.0f}% |")
    lines += ["", "| slowest ops | result shape | part | calls per step | ms per step |", "|---|---|---|---:|---:|"]
    for (name, shape, part), ms in by_op.most_common(args.top):
        lines.append(f"| {name} | `{shape.split('{')[0]}` | {part} | {calls[(name, shape, part)]:.0f} | {ms:.1f} |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
