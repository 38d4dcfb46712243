"""Export from a sharded model: the run loaded on an 8-device (data 2, fsdp 2, tensor 2) CPU mesh writes
byte-identical `llm` and `bundle` files to the single-device export (tensors are gathered one by one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from tiny_setup import tiny_config

HERE = Path(__file__).parent
SCRIPT = """
import sys
from alm_jax.export.formats import export
from alm_jax.export.source import load_run
from alm_jax.sharding import make_mesh
run = load_run(sys.argv[1], mesh=make_mesh(2, 2, 2))
assert len({d for x in [run.model.llm.embed_tokens.embedding[...]] for d in x.sharding.device_set}) > 1
for fmt in ("llm", "bundle"):
    export(run, fmt, sys.argv[2] + "/" + fmt, max_shard_bytes=50_000)
"""


@pytest.mark.multidevice
def test_sharded_export_equals_single_device_export(tiny, tmp_path):
    from alm_jax.config import to_dict
    from alm_jax.export.formats import export
    from alm_jax.export.source import load_run
    from alm_jax.models.lora import lora_layers
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path / "run", "model.lora.rank=2")
    model = build_alm(cfg.model, seed=cfg.seed)
    for _, layer in lora_layers(model):
        layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 0.01, jnp.float32))
    save_trained(model, cfg.checkpoint.dir, 3, to_dict(cfg))
    run = load_run(cfg.checkpoint.dir)
    for fmt in ("llm", "bundle"):
        export(run, fmt, tmp_path / "one" / fmt, max_shard_bytes=50_000)
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, cfg.checkpoint.dir, str(tmp_path / "eight")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for fmt in ("llm", "bundle"):
        one = {p.relative_to(tmp_path / "one" / fmt): p for p in (tmp_path / "one" / fmt).rglob("*.safetensors*")}
        eight = {p.relative_to(tmp_path / "eight" / fmt): p for p in (tmp_path / "eight" / fmt).rglob("*.safetensors*")}
        assert one.keys() == eight.keys() and len(one) > 2, fmt
        for name in one:
            assert one[name].read_bytes() == eight[name].read_bytes(), (fmt, name)


@pytest.mark.multidevice
def test_eval_of_a_one_device_run_in_an_eight_device_process(tiny, tmp_path):
    """`alm eval` lays the restored model out on the mesh its evaluators shard batches over: a run saved from
    one device evaluates in an 8-device process (it failed with "incompatible devices" when the model stayed on
    device 0) and gives the same held-out loss and listening gap as in a one-device process."""
    from alm_jax.config import to_dict
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path / "run")
    save_trained(build_alm(cfg.model, seed=cfg.seed), cfg.checkpoint.dir, 2, to_dict(cfg))
    metrics = {}
    for devices in (1, 8):
        out = tmp_path / f"eval{devices}"
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        r = subprocess.run([sys.executable, "-m", "alm_jax.cli", "eval", cfg.checkpoint.dir, "--suite", "loss",
                            "--data", paths["eval_corpus"], "--batches", "2", "--batch-size", "8", "--out", str(out),
                            "--set", "eval.listening_gap=true"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (devices, r.stderr[-3000:])
        metrics[devices] = next(iter(json.loads((out / "loss.json").read_text()).values()))
    assert metrics[1].keys() == metrics[8].keys() and "eval/listening_gap" in metrics[1]
    for key, value in metrics[1].items():
        assert metrics[8][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
