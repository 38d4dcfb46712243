"""Runs the tiny training setup in its own process (for kill -9 / SIGTERM / multi-device tests).

usage: run_tiny_train.py PATHS_JSON RUN_DIR OUT_JSON [kill:N | term:N | none] [overrides...]
Writes {"losses": {step: loss}, "step": final step, "stopped_by": ...} to OUT_JSON.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tiny_setup import tiny_config  # noqa: E402

from alm_jax.training.trainer import train  # noqa: E402


def main():
    paths, run_dir, out, action, *overrides = sys.argv[1:]
    cfg = tiny_config(json.loads(Path(paths).read_text()), Path(run_dir), *overrides)
    kind, _, at = action.partition(":")
    losses = {}

    def on_step(step, m):
        losses[step] = m["loss"]
        Path(out).write_text(json.dumps({"losses": losses, "step": step, "stopped_by": "running"}))
        if kind == "kill" and step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "term" and step == int(at) - 1:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives during the next step

    r = train(cfg, on_step=on_step)
    Path(out).write_text(json.dumps({"losses": {int(k): v for k, v in r.losses.items()}, "step": r.step,
                                     "stopped_by": r.stopped_by}))


if __name__ == "__main__":
    main()
