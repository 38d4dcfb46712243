"""The LLM on an 8-device CPU mesh (data=2, fsdp=2, tensor=2), loaded with `load_llm(..., mesh=mesh)`, gives
the logits and greedy tokens of the 1-device model (run in a subprocess: see tests/multidevice.py)."""

import numpy as np

from hf_tiny_llm import save, tiny_hf_llm
from multidevice import run_with_devices

SCRIPT = r"""
# argv: OUT.npz NAME PATH SCAN [NAME PATH SCAN ...]
import sys
import jax, numpy as np
from flax import nnx
from alm_jax.models.llm import generate_greedy
from alm_jax.weights.llm_params import load_llm
from alm_jax.sharding import batch_sharding, make_mesh

assert jax.device_count() == 8
mesh = make_mesh(data=2, fsdp=2, tensor=2)
rng = np.random.default_rng(0)
ids = rng.integers(0, 128, size=(4, 24)).astype(np.int32)
mask = np.ones_like(ids)
mask[1, :5] = mask[3, :9] = 0  # left padding

def forward(model, ids, mask):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask))
    return fn(state, ids, mask).block_until_ready()

out = {}
for name, path, scan in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    scan = scan == "scanned"
    single = load_llm(path, scan_layers=scan)
    sharded = load_llm(path, mesh=mesh, scan_layers=scan)
    spec = sharded.embed_tokens.embedding[...].sharding.spec
    q_spec = (sharded.layers if scan else sharded.layers[0]).self_attn.q_proj.kernel[...].sharding.spec
    out[name + "_specs"] = np.array([str(tuple(spec)), str(tuple(q_spec))])
    out[name + "_single"] = np.asarray(forward(single, ids, mask))
    batch = jax.device_put(ids, batch_sharding(mesh, 2)), jax.device_put(mask, batch_sharding(mesh, 2))
    logits = forward(sharded, *batch)
    out[name + "_sharded"] = np.asarray(logits)
    out[name + "_logits_devices"] = np.array(len(logits.sharding.device_set))
    out[name + "_tokens_single"] = np.asarray(generate_greedy(single, ids, mask, max_new_tokens=8).block_until_ready())
    out[name + "_tokens_sharded"] = np.asarray(generate_greedy(sharded, *batch, max_new_tokens=8).block_until_ready())
np.savez(sys.argv[1], **out)
"""


def test_sharded_logits_equal_single_device(tmp_path):
    """Llama with scanned layers (stacked parameters, the "layers" axis replicated), Qwen3 unrolled."""
    paths = {"llama": (save(tiny_hf_llm("llama"), tmp_path / "llama"), "scanned"),
             "qwen3": (save(tiny_hf_llm("qwen3", tied=True), tmp_path / "qwen3"), "unrolled")}
    out_file = tmp_path / "out.npz"
    run_with_devices(SCRIPT, str(out_file), *[x for name, (path, mode) in paths.items() for x in (name, path, mode)])
    out = np.load(out_file)
    q_specs = {"scanned": "(None, 'fsdp', 'tensor')", "unrolled": "('fsdp', 'tensor')"}
    for name, (_, mode) in paths.items():
        embed_spec, q_spec = out[name + "_specs"]
        assert (embed_spec, q_spec) == ("('tensor', 'fsdp')", q_specs[mode])
        assert int(out[name + "_logits_devices"]) == 8
        assert np.abs(out[name + "_sharded"] - out[name + "_single"]).max() <= 1e-5
        np.testing.assert_array_equal(out[name + "_tokens_sharded"], out[name + "_tokens_single"])
