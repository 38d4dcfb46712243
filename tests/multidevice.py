"""Run a Python snippet in a fresh process that sees N fake CPU devices.

The device count is fixed when jax initializes, and other tests in the pytest process have already
initialized it with one device, so multi-device checks run in a subprocess. Inside, wait on every result
(`block_until_ready`) before the next multi-device call: on few cores, queued collectives deadlock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_with_devices(script: str, *args: str, n_devices: int = 8, timeout: float = 240) -> str:
    """Runs `python -c script *args` with `n_devices` CPU devices; returns stdout, fails the test on error.
    The repository root and tests/ are importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode:
        pytest.fail(f"subprocess with {n_devices} devices exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout
