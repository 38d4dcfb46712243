"""Logits of `load_llm` models equal `transformers` PyTorch (float32) for Llama, Llama with llama3/linear rope
scaling, Qwen2 and Qwen3, tied and untied heads, full and left-padded batches; plus inputs_embeds and
segment-id (packing) equivalences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.stack import REMAT_POLICIES
from alm_jax.weights.llm_params import load_llm
from hf_tiny_llm import jit_forward, left_padded_batch, save, tiny_hf_llm, torch_logits

TOL = 1e-4
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
CASES = {
    "llama": ("llama", False, {}),
    "llama_tied": ("llama", True, {}),
    "llama_biases": ("llama", False, dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", True, dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=64)),
    "linear_rope": ("llama", False, dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0))),
    "qwen2": ("qwen2", False, {}),
    "qwen2_tied": ("qwen2", True, {}),
    "qwen3": ("qwen3", False, {}),
    "qwen3_tied": ("qwen3", True, dict(attention_bias=True)),
}


UNROLLED = ("llama_biases", "qwen3_tied")   # every case runs scanned (the default); these also unrolled


@pytest.mark.parametrize("case,scan", [(c, True) for c in sorted(CASES)] + [(c, False) for c in UNROLLED],
                         ids=lambda x: x if isinstance(x, str) else ("scanned" if x else "unrolled"))
def test_logits_match_transformers(case, scan, tmp_path):
    family, tied, overrides = CASES[case]
    hf = tiny_hf_llm(family, tied=tied, **overrides)
    model = load_llm(save(hf, tmp_path), scan_layers=scan)
    assert isinstance(model.layers, nnx.List) != scan
    assert (model.lm_head is None) == tied
    forward = jit_forward(model)
    ids, mask, position_ids, rows = left_padded_batch(np.random.default_rng(1), [30, 23, 30])

    ours = forward(ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 30, 128)
    theirs = torch_logits(hf, ids, mask, position_ids)
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() <= TOL
    for i, row in enumerate(rows):  # each padded row equals the unpadded sequence alone
        alone = torch_logits(hf, row[None])[0]
        assert np.abs(ours[i, -len(row):] - alone).max() <= TOL
    assert np.abs(forward(ids[:1]) - theirs[:1]).max() <= TOL  # no mask at all


def test_llama3_scaling_changes_logits(tmp_path):
    """The llama3 test case is not vacuous: the same weights with plain rope give different logits."""
    hf = tiny_hf_llm("llama", rope_parameters=LLAMA3_ROPE, max_position_embeddings=64)
    model = load_llm(save(hf, tmp_path))
    assert model.cfg.rope_type == "llama3" and model.cfg.rope_original_max_positions == 16
    ids = np.random.default_rng(2).integers(0, 128, size=(1, 40))
    scaled = jit_forward(model)(ids)
    model.cfg = dataclasses.replace(model.cfg, rope_type="default")
    plain = jit_forward(model)(ids)
    assert np.abs(scaled - torch_logits(hf, ids)).max() <= TOL
    assert np.abs(scaled - plain).max() > 1e-2


def test_inputs_embeds_equals_input_ids(tmp_path):
    model = load_llm(save(tiny_hf_llm("qwen3"), tmp_path))
    ids, mask, _, _ = left_padded_batch(np.random.default_rng(3), [12, 9])
    by_ids = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    by_embeds = model(inputs_embeds=model.embed(jnp.asarray(ids)), attention_mask=jnp.asarray(mask))
    hidden, _ = model.hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert hidden.shape == (2, 12, 64)
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_embeds))
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(model.logits(hidden)))


def test_packed_segments_equal_separate_sequences(tmp_path):
    model = load_llm(save(tiny_hf_llm("llama"), tmp_path))
    forward = jit_forward(model)
    rng = np.random.default_rng(4)
    first, second = rng.integers(0, 128, size=7), rng.integers(0, 128, size=11)
    packed = np.concatenate([first, second, [0, 0]])[None]  # two sequences + 2 padding tokens
    segment_ids = np.array([[1] * 7 + [2] * 11 + [0, 0]])
    mask = (segment_ids > 0).astype(np.int32)
    out = forward(packed, mask, segment_ids=segment_ids)
    assert np.abs(out[0, :7] - forward(first[None])[0]).max() <= 1e-5
    assert np.abs(out[0, 7:18] - forward(second[None])[0]).max() <= 1e-5
    explicit = forward(packed, mask, segment_ids=segment_ids,
                       positions=np.array([list(range(7)) + list(range(11)) + [0, 0]]))
    np.testing.assert_array_equal(out, explicit)


def test_config_from_hf_variants():
    """Old-style `rope_scaling` + top-level `rope_theta`, defaults, and clear errors."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=128)
    old = LLMConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert (old.rope_type, old.rope_theta, old.rope_original_max_positions) == ("llama3", 500000.0, 8192)
    plain = LLMConfig.from_hf(base)
    assert (plain.num_kv_heads, plain.head_dim, plain.rope_type, plain.tie_word_embeddings) == (4, 8, "default", False)
    assert LLMConfig.from_hf({**base, "model_type": "qwen3"}).head_dim == 128  # transformers' Qwen3 default
    with pytest.raises(WeightImportError, match="supported: llama, qwen2, qwen3"):
        LLMConfig.from_hf({**base, "model_type": "mistral"})
    with pytest.raises(WeightImportError, match="yarn"):
        LLMConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.warns(UserWarning, match="sliding_window"):
        LLMConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64})


def _axes(model) -> dict:
    return {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(model))}


def test_param_axes_and_dtypes():
    cfg = LLMConfig(model_type="qwen3", qk_norm=True, qkv_bias=True)
    model = DecoderLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), scan_layers=False)
    axes = _axes(model)
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert axes["layers.0.self_attn.k_proj.bias"] == ("kv_heads",)
    assert axes["layers.0.self_attn.o_proj.kernel"] == ("heads", "embed")
    assert axes["layers.1.self_attn.q_norm.scale"] == ("norm",)
    assert axes["layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert axes["lm_head.kernel"] == ("embed", "vocab")
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16  # logits dtype: test_weight_import
    # scanned: one stacked block, every layer parameter with the leading "layers" axis, nothing per index
    scanned = DecoderLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    stacked = _axes(scanned)
    assert stacked["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert stacked["layers.self_attn.q_norm.scale"] == ("layers", "norm")
    assert stacked["embed_tokens.embedding"] == ("vocab", "embed")
    assert scanned.layers.mlp.down_proj.kernel.shape == (cfg.num_layers, cfg.intermediate_size, cfg.hidden_size)
    assert {k for k in stacked if k.startswith("layers.")} == {
        "layers." + k.split(".", 2)[2] for k in axes if k.startswith("layers.")}
    assert all(a[0] == "layers" for k, a in stacked.items() if k.startswith("layers."))


def _eqns(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _eqns(sub)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_remat_checkpoints_each_block_with_its_policy(scan):
    """model.remat reaches the blocks: one jax.checkpoint per traced block (the scan body once, or each
    unrolled layer) with the configured policy, none for "none"."""
    for remat, policy in REMAT_POLICIES.items():
        model = DecoderLM(LLMConfig(num_layers=2), rngs=nnx.Rngs(0), scan_layers=scan, remat=remat)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda e: nnx.merge(graphdef, state)(inputs_embeds=e).sum())(jnp.ones((1, 3, 64)))
        found = [e.params["policy"] for e in _eqns(jaxpr) if e.primitive.name in ("checkpoint", "remat2")]
        assert found == ([] if policy is None else [policy] * (1 if scan else 2)), remat
    with pytest.raises(ConfigError, match="remat='some'"):
        DecoderLM(LLMConfig(), rngs=nnx.Rngs(0), remat="some")
