"""Fault matrix, export: a process killed at any point of an export (os._exit mid-tensor-stream, mid-close, after
the weights) leaves `--out` without a file anything would load; rerunning the same export writes exactly the files
of an uninterrupted one. A non-empty `--out` is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from tiny_setup import tiny_config

HERE = Path(__file__).parent
# exports `fmt` of the run in argv[1] into argv[2], dying (os._exit, no cleanup: like kill -9) at `point`
SCRIPT = """
import os, sys
from alm_jax.export import formats, writer
from alm_jax.export.source import load_run
ckpt, out, fmt, point = sys.argv[1:5]
calls = {"add": 0}
add, close = writer.ShardedSafetensorsWriter.add, writer.ShardedSafetensorsWriter.close
def dying_add(self, name, array):
    calls["add"] += 1
    if point == "add" and calls["add"] == 5:
        os._exit(9)
    return add(self, name, array)
def dying_close(self):
    files = close(self)
    if point == "close":
        os._exit(9)
    return files
writer.ShardedSafetensorsWriter.add, writer.ShardedSafetensorsWriter.close = dying_add, dying_close
formats.export(load_run(ckpt), fmt, out, max_shard_bytes=30_000)
os._exit(0 if point == "none" else 3)
"""


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    from alm_jax.config import to_dict
    from alm_jax.models.lora import lora_layers
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path_factory.mktemp("run"),
                      "model.lora.rank=2")
    model = build_alm(cfg.model, seed=cfg.seed)
    for _, layer in lora_layers(model):
        layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 0.02, jnp.float32))
    save_trained(model, cfg.checkpoint.dir, 2, to_dict(cfg))
    return cfg.checkpoint.dir


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["llm", "bundle"])
def test_a_killed_export_leaves_nothing_loadable_and_a_rerun_is_exact(ckpt, tmp_path, fmt):
    from alm_jax.errors import ConfigError
    from alm_jax.export.formats import STAGING, export
    from alm_jax.export.source import load_run
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu"}
    run = load_run(ckpt)
    export(run, fmt, tmp_path / "clean", max_shard_bytes=30_000)
    clean = _files(tmp_path / "clean")
    for point in (("add",) if fmt == "llm" else ("close",)):   # mid tensor stream / after the weights
        out = tmp_path / point
        r = subprocess.run([sys.executable, "-c", SCRIPT, ckpt, str(out), fmt, point], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 9, r.stderr[-2000:]
        assert [p.name for p in out.iterdir()] == [STAGING]          # nothing outside the staging area
        export(run, fmt, out, max_shard_bytes=30_000)               # the rerun
        assert _files(out) == clean, point
    with pytest.raises(ConfigError, match="already holds"):
        export(run, fmt, tmp_path / "clean")
