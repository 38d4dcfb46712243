"""Training stall of an async vs a synchronous checkpoint save (`alm_jax.training.checkpoint.Checkpointer`).

    .venv/bin/python benchmarks/bench_checkpoint.py [--mb 200] [--saves 5] [--dir /tmp/bench_ckpt]

A ~`--mb` MB float32 state is updated by a jitted, donating "train step". For each save we time the
`save()` call and the stall: from the start of `save()` until the next step has finished, minus one
plain step (so the stall is what the save adds to the loop). For async saves we also time how long the
background write takes to finish (`wait()`). Medians over saves 2..N (the first one carries set-up) and
the first save separately. On CPU a third row shows an async save without the Checkpointer's CPU copy
(the donating step then waits for the whole write). Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _state(mb: float, pieces: int = 8) -> dict:
    n = int(mb * 2**20 / 4 / pieces)
    return {f"w{i}": jnp.full((n,), float(i), jnp.float32) for i in range(pieces)}


def _bench(mode: str, mb: float, saves: int, root: Path) -> dict:
    from alm_jax.training.checkpoint import Checkpointer

    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0.999 + 1e-3, s), donate_argnums=0)
    state = _state(mb)
    state = step(state)
    jax.block_until_ready(state)
    plain = []
    for _ in range(5):
        t = time.perf_counter()
        state = step(state)
        jax.block_until_ready(state)
        plain.append(time.perf_counter() - t)
    t_step = float(np.median(plain))

    where = root / mode.replace(", ", "-").replace(" ", "-")
    ckpt = Checkpointer(where, keep_last=2, async_save=mode.startswith("async"),
                        cpu_copy=(mode != "async, no CPU copy"))
    call, stall, write = [], [], []
    for i in range(1, saves + 1):
        t0 = time.perf_counter()
        ckpt.save(i, state, force=True)
        t1 = time.perf_counter()
        state = step(state)                    # the next step (donates the saved buffers)
        jax.block_until_ready(state)
        t2 = time.perf_counter()
        ckpt.wait()                            # async: the background write; sync: nothing left
        t3 = time.perf_counter()
        call.append(t1 - t0)
        stall.append(t2 - t0 - t_step)
        write.append(t3 - t0)
    ckpt.close()
    shutil.rmtree(where, ignore_errors=True)
    med = lambda xs: float(np.median(xs[1:] if len(xs) > 1 else xs))  # noqa: E731
    return dict(mode=mode, step=t_step, call=med(call), stall=max(med(stall), 0.0), write=med(write),
                first_call=call[0], first_stall=max(stall[0], 0.0))


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        modes = ["sync", "async"] + (["async, no CPU copy"] if jax.devices()[0].platform == "cpu" else [])
        results = [_bench(m, args.mb, args.saves, root) for m in modes]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    dev = jax.devices()[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_checkpoint.py",
                                            *(argv if argv is not None else sys.argv[1:])])
    rows = ["| save | state | save() call | stall added to the loop | write finished | first save: call / stall "
            "| plain step | device | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['mode']} | {args.mb:g} MB f32 | {r['call'] * 1e3:.0f} ms | {r['stall'] * 1e3:.0f} ms | "
                    f"{r['write'] * 1e3:.0f} ms | {r['first_call'] * 1e3:.0f} / {r['first_stall'] * 1e3:.0f} ms | "
                    f"{r['step'] * 1e3:.0f} ms | {dev.platform} ({dev.device_kind}) | `{cmd}` |")
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
