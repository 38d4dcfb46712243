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
from alm_jax.models.lora import (LoRALinear, apply_lora, linear_module_paths, lora_layers, lora_per_layer, merge_lora,
                                 unmerge_lora)
from alm_jax.models.stack import make_stack, run_stack, stacks, unstack
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


# ---- scanned layer stacks (models/stack.py): stacked factors, per-layer regex, a mask for partial picks

class _StackModel(nnx.Module):
    """Three `_Block`s as a layer stack, scanned or unrolled, and a head."""

    def __init__(self, rngs, scan: bool):
        self.layers = make_stack(lambda r: _Block(8, r), 3, scan=scan, rngs=rngs)
        self.head = Linear(8, 5, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, x):
        x, _ = run_stack(self.layers, lambda block, h, _: (block(h), None), x)
        return self.head(x)


def _unrolled_copy(scanned: _StackModel) -> _StackModel:
    """An unrolled model with the scanned one's weights (and LoRA factors of the adapted layers)."""
    model = _StackModel(nnx.Rngs(5), scan=False)
    target = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    found = stacks(scanned)
    for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        for one_path, value in unstack(tuple(path), var[...], found):
            one_path = tuple(p for p in one_path if p != "base")   # the unrolled copy is not wrapped yet
            if one_path in target:
                target[one_path].set_value(value)
    return model


TARGET = r"layers/(0|2)/attn/value|up$"   # value: layers 0 and 2 of 3; up: every layer


def test_scanned_stack_lora_is_stacked_masked_and_equals_unrolled():
    scanned = _StackModel(nnx.Rngs(0), scan=True)
    wrapped = apply_lora(scanned, rank=2, alpha=4.0, target_regex=TARGET, rngs=nnx.Rngs(1))
    assert wrapped == ["layers/0/attn/value", "layers/0/up", "layers/1/up", "layers/2/attn/value", "layers/2/up"]
    value, up = scanned.layers.attn.value, scanned.layers.up
    assert value.lora_a.shape == (3, 8, 2) and value.lora_b.shape == (3, 2, 8)
    assert value.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    assert up.lora_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "mlp")
    np.testing.assert_array_equal(np.asarray(value.layer_mask[...]), [1, 0, 1])
    assert up.layer_mask is None                     # every layer adapted: no mask
    assert [x.path for x in lora_per_layer(scanned)] == wrapped
    assert len({float(jnp.std(value.lora_a[...][i])) for i in range(3)}) == 3   # each layer its own draw
    _randomize_b(scanned)

    unrolled = _unrolled_copy(scanned)
    assert apply_lora(unrolled, rank=2, alpha=4.0, target_regex=TARGET, rngs=nnx.Rngs(1)) == wrapped
    assert linear_module_paths(unrolled) == linear_module_paths(scanned)
    for one in lora_per_layer(unrolled):
        i = int(one.path.split("/")[1])
        wrapper = scanned.layers.attn.value if one.path.endswith("value") else scanned.layers.up
        one.wrapper.lora_a.set_value(wrapper.lora_a[...][i])
        one.wrapper.lora_b.set_value(wrapper.lora_b[...][i])
    want = unrolled(X)
    assert float(jnp.max(jnp.abs(scanned(X) - want))) <= 1e-5

    kernel = np.asarray(value.base.kernel[...])
    assert merge_lora(scanned) == 2 and float(jnp.max(jnp.abs(scanned(X) - want))) <= 1e-5
    np.testing.assert_array_equal(np.asarray(value.base.kernel[...])[1], kernel[1])   # layer 1: not adapted
    assert np.abs(np.asarray(value.base.kernel[...])[0] - kernel[0]).max() > 1e-4
    assert unmerge_lora(scanned) == 2
    np.testing.assert_allclose(np.asarray(value.base.kernel[...]), kernel, atol=1e-6)


def test_scanned_stack_lora_gradients_skip_not_adapted_layers():
    model = _StackModel(nnx.Rngs(0), scan=True)
    apply_lora(model, rank=2, alpha=2.0, target_regex=r"layers/1/attn/value", rngs=nnx.Rngs(1))
    grad_fn = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)))
    g = np.asarray(grad_fn(model).layers.attn.value.lora_b[...])
    assert np.abs(g[1]).max() > 0 and np.abs(g[[0, 2]]).max() == 0


def test_scanned_stack_lora_dropout_draws_the_unrolled_masks_call_after_call():
    """LoRA dropout in a scanned stack: each layer its own stream (keys and counts stacked [L], advanced once
    per call and written back), the same masks as the unrolled stack's wrappers draw, call after call."""
    scanned = _StackModel(nnx.Rngs(0), scan=True)
    assert apply_lora(scanned, rank=2, alpha=4.0, dropout=0.5, target_regex=TARGET, rngs=nnx.Rngs(1))
    _randomize_b(scanned)
    unrolled = _unrolled_copy(scanned)
    apply_lora(unrolled, rank=2, alpha=4.0, dropout=0.5, target_regex=TARGET, rngs=nnx.Rngs(1))
    for one in lora_per_layer(unrolled):
        i = int(one.path.split("/")[1])
        wrapper = scanned.layers.attn.value if one.path.endswith("value") else scanned.layers.up
        one.wrapper.lora_a.set_value(wrapper.lora_a[...][i])
        one.wrapper.lora_b.set_value(wrapper.lora_b[...][i])
    assert scanned.layers.up.dropout.rngs.count.shape == (3,)
    outs = []
    for _ in range(2):
        a, b = scanned(X), unrolled(X)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5
        outs.append(a)
    np.testing.assert_array_equal(np.asarray(scanned.layers.up.dropout.rngs.count[...]), [2, 2, 2])
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3      # new masks each call
    scanned.eval()
    unrolled.eval()
    assert float(jnp.max(jnp.abs(scanned(X) - outs[1]))) > 1e-3     # eval: no dropout
    assert float(jnp.max(jnp.abs(scanned(X) - unrolled(X)))) <= 1e-5
