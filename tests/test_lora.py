"""LoRA: which layers get wrapped, which variables are LoRAParam, exact merge/unmerge, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alm_jax.errors import ConfigError
from alm_jax.models.layers import Linear
from alm_jax.models.lora import LoRALinear, apply_lora, lora_layers, merge_lora, unmerge_lora
from alm_jax.sharding import make_mesh, state_shardings


class _Attention(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.heads = heads
        self.query = Linear(d, d, axes=("embed", "heads"), rngs=rngs)
        self.key = Linear(d, d, axes=("embed", "kv_heads"), rngs=rngs)
        self.value = Linear(d, d, axes=("embed", "kv_heads"), rngs=rngs)
        self.out = Linear(d, d, axes=("heads", "embed"), rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d))


class _Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn = _Attention(d, 2, rngs)
        self.up = Linear(d, 2 * d, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.down = Linear(2 * d, d, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(jax.nn.gelu(self.up(x)))


class _TinyModel(nnx.Module):
    """Two blocks and a head, all `alm_jax` Linears. x `[batch, T, 8]` -> logits `[batch, T, 5]`."""

    def __init__(self, rngs):
        self.layers = nnx.List([_Block(8, rngs), _Block(8, rngs)])
        self.head = Linear(8, 5, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)


def _randomize_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.1, jnp.float32))


def test_regex_selects_exactly_the_named_layers():
    model = _TinyModel(nnx.Rngs(0))
    wrapped = apply_lora(model, rank=2, alpha=4.0, target_regex=r"attn/(query|value)$", rngs=nnx.Rngs(1))
    assert wrapped == ["layers/0/attn/query", "layers/0/attn/value", "layers/1/attn/query", "layers/1/attn/value"]
    for block in model.layers:
        assert isinstance(block.attn.query, LoRALinear) and isinstance(block.attn.value, LoRALinear)
        for name in ("key", "out"):
            assert type(getattr(block.attn, name)) is Linear
        assert type(block.up) is Linear and type(block.down) is Linear
    assert type(model.head) is Linear
    assert [p for p, _ in lora_layers(model)] == wrapped


def test_only_lora_weights_are_lora_params_with_rank_axes():
    model = _TinyModel(nnx.Rngs(0))
    apply_lora(model, rank=3, alpha=6.0, target_regex=r"layers/1/(up|down)", rngs=nnx.Rngs(1))
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert set(flat) == {"layers/1/up/lora_a", "layers/1/up/lora_b", "layers/1/down/lora_a", "layers/1/down/lora_b"}
    assert flat["layers/1/up/lora_a"].shape == (8, 3) and flat["layers/1/up/lora_b"].shape == (3, 16)
    assert flat["layers/1/up/lora_a"].get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert flat["layers/1/up/lora_b"].get_metadata()["out_sharding"] == ("lora_rank", "mlp")
    np.testing.assert_array_equal(np.asarray(flat["layers/1/down/lora_b"][...]), 0)  # B starts at zero
    # the base weights stay plain Params (the frozen subset)
    plain = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert all(not isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(plain))
    # the logical axes resolve through the mesh rule table
    shardings = state_shardings(nnx.state(model, nnx.LoRAParam), make_mesh(devices=jax.devices()[:1]))
    spec = shardings["layers"][1]["up"]["lora_a"].get_value().spec
    assert spec == P("fsdp", None)


def test_init_is_a_no_op_and_merge_unmerge_match():
    model = _TinyModel(nnx.Rngs(0))
    before = model(X)
    apply_lora(model, rank=2, alpha=8.0, target_regex=r"attn/(query|value)|up$", rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(X)), np.asarray(before))  # B = 0
    _randomize_b(model)
    kernel0 = np.asarray(model.layers[0].up.base.kernel[...])
    unmerged = model(X)
    assert float(jnp.max(jnp.abs(unmerged - before))) > 1e-3
    assert merge_lora(model) == 6
    assert all(layer.merged for _, layer in lora_layers(model))
    merged = model(X)
    assert float(jnp.max(jnp.abs(merged - unmerged))) <= 1e-5
    up = model.layers[0].up
    np.testing.assert_allclose(np.asarray(up.base.kernel[...]), kernel0 + np.asarray(up.lora_a[...])
                               @ np.asarray(up.lora_b[...]) * 4.0, atol=1e-6)
    assert merge_lora(model) == 0  # idempotent
    assert unmerge_lora(model) == 6
    np.testing.assert_allclose(np.asarray(model.layers[0].up.base.kernel[...]), kernel0, atol=1e-6)
    assert float(jnp.max(jnp.abs(model(X) - unmerged))) <= 1e-5


def test_no_match_names_the_regex():
    model = _TinyModel(nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"'q_proj\|v_proj' matches no Linear"):
        apply_lora(model, rank=2, alpha=2.0, target_regex="q_proj|v_proj", rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="not a valid regex"):
        apply_lora(model, rank=2, alpha=2.0, target_regex="(", rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(model, rank=0, alpha=2.0, target_regex="head", rngs=nnx.Rngs(1))
    apply_lora(model, rank=2, alpha=2.0, target_regex="head", rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="matches no Linear"):  # the wrapped base is not wrapped again
        apply_lora(model, rank=2, alpha=2.0, target_regex="head", rngs=nnx.Rngs(1))


def test_gradients_reach_only_lora_params():
    model = _TinyModel(nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=2.0, target_regex=r"attn/query$|head", rngs=nnx.Rngs(1))
    loss = lambda m: jnp.sum(m(X) ** 2)  # noqa: E731
    grad_fn = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
    grads = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grad_fn(model))}
    assert set(grads) == {f"{p}/{w}" for p in ("layers/0/attn/query", "layers/1/attn/query", "head")
                          for w in ("lora_a", "lora_b")}
    for name, g in grads.items():  # B = 0 at init: dL/dA = 0, dL/dB != 0
        assert np.all(np.isfinite(g))
        assert (np.max(np.abs(g)) > 0) == name.endswith("lora_b"), name
    _randomize_b(model)
    grads = nnx.to_flat_state(grad_fn(model))
    assert all(np.max(np.abs(np.asarray(v[...]))) > 0 for _, v in grads)


def test_dropout_applies_to_the_lora_branch_only_in_training():
    model = _TinyModel(nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=2.0, dropout=0.5, target_regex="head", rngs=nnx.Rngs(1))
    _randomize_b(model)
    a, b = model(X), model(X)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    model.eval()
    c = model(X)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(model(X)))
    head = model.head
    base_only = head.base(model.layers[1](model.layers[0](X)))
    assert float(jnp.max(jnp.abs(c - base_only))) > 1e-4  # eval keeps the LoRA branch, without dropout
