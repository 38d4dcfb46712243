"""`alm compile`: TPU slice names, shape-only models, and a real ahead-of-time compile with libtpu.

libtpu is the optional `tpu` extra; it is installed here into a cache directory of its own (not the test
venv: with libtpu importable, every jax process would try to start a TPU backend) and put on PYTHONPATH of
the `alm compile` subprocess only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.training.aot import CompileReport, require_fit
from alm_jax.training.tpu_topology import tpu_slice
from alm_jax.weights.alm_params import abstract_alm, build_alm
from alm_jax.weights.architectures import PUBLISHED, architecture_config
from tiny_setup import tiny_config

ROOT = Path(__file__).parent.parent
ALM = str(Path(sys.executable).parent / "alm")


def test_tpu_slice_names():
    v5p = tpu_slice("v5p-64")
    assert (v5p.generation, v5p.topology, v5p.chips, v5p.topology_name) == ("v5p", "2x4x4", 32, "v5p:2x4x4")
    assert v5p.hbm_bytes == 95 * 2**30
    assert (tpu_slice("v6e-16").topology, tpu_slice("v6e-16").chips) == ("4x4", 16)
    assert (tpu_slice("v5litepod-8").generation, tpu_slice("v5litepod-8").topology) == ("v5e", "2x4")
    assert tpu_slice("v4-8").chips == 4
    raw = tpu_slice("v5p:2x2x2")
    assert (raw.chips, raw.topology) == (8, "2x2x2")
    with pytest.raises(ConfigError, match="v5p-8, v5p-16"):
        tpu_slice("v5p-48")
    with pytest.raises(ConfigError, match="not known"):
        tpu_slice("v7x-8")
    with pytest.raises(ConfigError, match="2x4x4"):
        tpu_slice("v5p:big")


def test_architecture_config_reads_the_dir_or_the_published_table(tmp_path):
    assert architecture_config("/nowhere/Llama-3.1-8B-Instruct", "model.llm")["hidden_size"] == 4096
    assert architecture_config("/models/whisper-large-v3/", "x")["num_mel_bins"] == 128
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert architecture_config(str(tmp_path), "model.llm")["hidden_size"] == 8
    with pytest.raises(ConfigError, match="model.llm=.*config.json"):
        architecture_config("/nowhere/Unknown-7B", "model.llm")
    assert set(PUBLISHED) >= {"Llama-3.1-8B-Instruct", "Qwen3-4B-Thinking-2507", "whisper-large-v3", "w2v-bert-2.0"}


def test_abstract_alm_has_the_shapes_of_the_built_model(tiny, tmp_path):
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path, "model.lora.rank=2")
    built = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(build_alm(cfg.model)))
    abstract = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract_alm(cfg.model)))
    assert jax.tree.structure(built) == jax.tree.structure(abstract)
    assert jax.tree.leaves(built) == jax.tree.leaves(abstract)


def test_require_fit_names_the_numbers_and_the_knobs():
    r = CompileReport(topology="v5e-4", devices=4, mesh={"data": 1, "fsdp": 4, "tensor": 1}, hbm_bytes=16 * 2**30,
                      argument_bytes=10 * 2**30, output_bytes=2**30, temp_bytes=8 * 2**30, alias_bytes=2**30,
                      code_bytes=0, params={"trainable": 1, "frozen": 1}, model_flops_per_step=10**15,
                      compiled_flops_per_device=None, peak_flops_per_device=197e12, lower_seconds=0, compile_seconds=0)
    assert r.total_bytes == 18 * 2**30 and not r.fits
    with pytest.raises(ConfigError, match=r"18.0 GiB per device on v5e-4 \(16 GiB HBM\).*optim.grad_accum"):
        require_fit(r)


@pytest.fixture(scope="module")
def libtpu_dir():
    """libtpu of the version the installed jax pins (`jax[tpu]`), in a cache directory of its own."""
    pin = next(r for r in __import__("importlib.metadata").metadata.requires("jax")
               if r.startswith("libtpu") and 'extra == "tpu"' in r).split(";")[0].strip()
    home = Path(os.environ.get("ALM_HOME", Path.home() / ".cache" / "alm_jax"))
    target = home / f"libtpu-jax{jax.__version__}"
    if not (target / "libtpu").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), pin],
                       check=True)
    return target


def _compile(libtpu_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(libtpu_dir), "JAX_PLATFORMS": ""}
    return subprocess.run([ALM, "compile", *args], capture_output=True, text=True, env=env, timeout=900)


def test_alm_compile_tiny_config_for_a_multislice_v5p(tiny, tmp_path, libtpu_dir):
    paths = json.loads((tiny / "paths.json").read_text())
    overrides = [f"model.llm={paths['llm']}", f"model.encoders.0.path={paths['whisper']}",
                 "model.encoders.0.pad_to_seconds=null", "model.encoders.0.taps=[0,1]", "model.connector.kind=desta",
                 "model.connector.num_queries=4", "model.connector.num_layers=1", "model.connector.num_heads=4",
                 "model.connector.hidden=32", "model.connector.intermediate=64", "data.batch_size=16",
                 "data.max_text_tokens=48", "data.max_audio_seconds=0.6", "mesh.fsdp=-1", "mesh.data=1",
                 "mesh.dcn_data=2"]
    out = tmp_path / "report.json"
    p = _compile(libtpu_dir, str(ROOT / "configs" / "demo.yaml"), *overrides, "--topology", "v5p-8",
                 "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "topology 2 x v5p-8: 8 devices, mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in p.stdout
    assert "of 95 GiB HBM" in p.stdout and "fits" in p.stdout
    r = json.loads(out.read_text())
    assert r["fits"] and r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert 0 < r["total_bytes"] < 2**30 and r["argument_bytes"] > 0 and r["temp_bytes"] > 0
    # the compiled program's FLOPs and the trainable-aware count describe the same step (8 devices)
    assert r["model_flops_per_step"] > 0 and r["compiled_flops_per_device"] > 0
    assert 0.2 < 8 * r["compiled_flops_per_device"] / r["model_flops_per_step"] < 5

    bad = _compile(libtpu_dir, str(ROOT / "configs" / "demo.yaml"), *overrides[:-3], "mesh.fsdp=3",
                   "--topology", "v5p-8")
    assert bad.returncode != 0 and "mesh" in bad.stderr and "4 devices" in bad.stderr, bad.stderr[-2000:]
