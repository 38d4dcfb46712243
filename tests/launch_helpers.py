"""Helpers shared by the launch and hybrid-mesh tests: a clean environment for launcher subprocesses and
the tiny training run in one process with N CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
STEPS = 3          # enough to compare losses step by step; compilation dominates the time


def clean_env(**extra) -> dict:
    """os.environ without the variables the launchers and JAX read, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "OMPI_", "XLA_", "NNODES", "NODE_RANK", "MASTER_", "GPUS_PER_NODE",
                                "PROJECT", "ZONE", "ACCELERATOR_TYPE", "SLICE", "BUCKET", "RUNTIME_VERSION", "RUN",
                                "SPOT", "SKIP_INSTALL", "REQUEUE", "ALM", "DEVICES_PER_PROCESS", "PORT", "LOG_DIR"))}
    env.update(extra)
    return env


STEPS_OVERRIDES = (f"steps={STEPS}", "logging.every=1", "data.shards=2")


def single_process_losses(tiny, run_dir: Path, *overrides: str, devices: int = 8) -> dict[int, float]:
    """The tiny run in one process with `devices` CPU devices (tests/run_tiny_train.py): step -> loss."""
    out = run_dir.parent / f"{run_dir.name}.json"
    env = clean_env(JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, str(HERE / "run_tiny_train.py"), str(tiny / "paths.json"), str(run_dir),
                        str(out), "none", *STEPS_OVERRIDES, *overrides],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["step"] == STEPS and result["stopped_by"] == "done"
    return {int(k): v for k, v in result["losses"].items()}
