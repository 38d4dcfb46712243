"""Does the demo train the same on 1 and on 8 (fake CPU) devices? Loss and gradient norm per step, side by side.

    .venv/bin/python benchmarks/mesh_parity.py [--corpus runs/demo/corpus/balsa] [--steps 5]

Runs `alm train configs/demo.yaml` twice on the same corpus, seed and batches (the pipeline gives the same
global batches for any device count), once with one CPU device and once with
`--xla_force_host_platform_device_count=8` (data parallel, the batch of 8 split 8 ways), logging every step,
no evaluation, checkpoints in a temporary directory; then prints each step's loss and global gradient norm from
both runs and their relative differences. Step 1 starts from the same weights, so its loss and gradient compare
the two meshes' arithmetic; later steps add how Adam carries the float differences forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from alm_jax.demo import DEMO_CONFIG, alm_command

REPO = DEMO_CONFIG.parent.parent


def train(devices: int, corpus: str, steps: int, work: Path) -> list[dict]:
    out = work / f"d{devices}"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = alm_command() + [
        "train", str(DEMO_CONFIG), f"data.corpus=[{corpus}]", "data.weights=[1]", f"steps={steps}",
        f"optim.total_steps={steps}", "logging.every=1", "eval.every=0", f"checkpoint.dir={out / 'ckpt'}",
        "checkpoint.every=1000", f"logging.dir={out / 'log'}", "resume=none", "seed=0"]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "log" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(REPO / "runs" / "demo" / "corpus" / "balsa"))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, eight = (train(d, args.corpus, args.steps, Path(tmp)) for d in (1, 8))
    print("| step | loss, 1 device | loss, 8 devices | rel. diff | grad norm, 1 device | grad norm, 8 devices | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(one, eight):
        rel = lambda k: abs(a[k] - b[k]) / abs(a[k])
        print(f"| {a['step']} | {a['loss']:.6f} | {b['loss']:.6f} | {rel('loss'):.1e} | {a['grad_norm']:.6f} | "
              f"{b['grad_norm']:.6f} | {rel('grad_norm'):.1e} |")
    print(f"\ncommand: .venv/bin/python benchmarks/mesh_parity.py --corpus {args.corpus} --steps {args.steps}")


if __name__ == "__main__":
    main()
