"""The pure train step: masked loss, trainable-only gradients, accumulation, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alm_jax.config import OptimConfig, load_config
from alm_jax.errors import ConfigError
from alm_jax.models.layers import Embed, Linear, RMSNorm
from alm_jax.training.step import (TrainState, build_train_step, make_optimizer, make_schedule, masked_cross_entropy,
                                   param_path, split_microbatches)


class TinyLM(nnx.Module):
    """A frozen embedding + body and a trainable 'adapter' and head: enough to exercise the step."""

    def __init__(self, rngs):
        self.embed = Embed(32, 16, rngs=rngs)
        self.body = Linear(16, 16, axes=("embed", "mlp"), rngs=rngs)
        self.adapter = Linear(16, 16, axes=("conn_embed", "conn_mlp"), use_bias=True, rngs=rngs)
        self.norm = RMSNorm(16)
        self.head = Linear(16, 32, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, ids):
        h = jnp.tanh(self.body(self.embed(ids)))
        return self.head(self.norm(h + self.adapter(h)))


def loss_fn(model, batch):
    s, n = masked_cross_entropy(model(batch["input_ids"]), batch["targets"], batch["loss_mask"])
    return s, n, {}


TRAINABLE = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("adapter"), nnx.PathContains("head")))


def make_batch(seed, b=8, t=6):
    r = np.random.default_rng(seed)
    ids = r.integers(0, 32, (b, t))
    mask = (r.random((b, t)) > 0.3).astype(np.float32)
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, 1)), "loss_mask": jnp.asarray(mask)}


def test_masked_cross_entropy_matches_optax():
    r = np.random.default_rng(0)
    logits = jnp.asarray(r.normal(size=(2, 5, 7)), jnp.float32)
    tgt = jnp.asarray(r.integers(0, 7, (2, 5)))
    mask = jnp.asarray([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], jnp.float32)
    s, n = masked_cross_entropy(logits, tgt, mask)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    np.testing.assert_allclose(s, float(jnp.sum(ref * mask)), rtol=1e-6)
    assert float(n) == 6.0


def _setup(grad_accum=1):
    model = TinyLM(nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    cfg = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10, grad_accum=grad_accum)
    tx = make_optimizer(cfg)
    opt_state = tx.init(trainable)
    step = build_train_step(graphdef, tx, loss_fn, grad_accum=grad_accum, donate=False)
    return trainable, frozen, opt_state, step


def test_only_trainable_params_change_and_frozen_have_no_optimizer_state():
    trainable, frozen, opt_state, step = _setup()
    frozen_before = jax.tree.map(np.asarray, frozen)
    trainable_before = jax.tree.map(np.asarray, trainable)
    st, m = step(TrainState(trainable, opt_state), frozen, make_batch(0), 0)
    new_t, new_opt = st.trainable, st.opt_state
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(trainable_before), jax.tree.leaves(new_t))]
    assert all(changed)
    # adam mu and nu: one leaf each per trainable leaf, none for frozen ones
    n_trainable = len(jax.tree.leaves(trainable))
    moment_leaves = [x for x in jax.tree.leaves(new_opt) if x.ndim > 0]
    assert len(moment_leaves) == 2 * n_trainable
    assert len(jax.tree.leaves(frozen)) == 3  # embedding, body kernel, norm scale
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))


def test_grad_accumulation_equals_full_batch():
    batch = make_batch(1)
    t1, f1, o1, step1 = _setup(grad_accum=1)
    t4, f4, o4, step4 = _setup(grad_accum=4)
    st_a, ma = step1(TrainState(t1, o1), f1, batch, 0)
    a = st_a.trainable
    st_b, mb = step4(TrainState(t4, o4), f4, batch, 0)
    b = st_b.trainable
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_grad_accumulation_gradients_equal():
    """The gradients themselves (not only the updated params) agree within 1e-5."""
    model = TinyLM(nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    batch = make_batch(2)

    def total_grad(tp, mb):
        def f(tp):
            s, n, _ = loss_fn(nnx.merge(graphdef, tp, frozen), mb)
            return s
        return jax.grad(f)(tp), loss_fn(nnx.merge(graphdef, tp, frozen), mb)[1]

    g_full, n_full = total_grad(trainable, batch)
    mbs = split_microbatches(batch, 4)
    acc, n_acc = None, 0.0
    for i in range(4):
        g, n = total_grad(trainable, jax.tree.map(lambda x: x[i], mbs))
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        n_acc += float(n)
    assert n_acc == float(n_full)
    for x, y in zip(jax.tree.leaves(g_full), jax.tree.leaves(acc)):
        np.testing.assert_allclose(np.asarray(x) / n_acc, np.asarray(y) / n_acc, atol=1e-5)


def test_nonfinite_batch_is_skipped():
    trainable, frozen, opt_state, step = _setup()
    before = jax.tree.map(np.asarray, trainable)
    bad = make_batch(3)
    # poison the frozen embedding output via a NaN in the frozen state copy
    poisoned = jax.tree.map(lambda x: x * jnp.nan if x.ndim == 2 and x.shape[0] == 32 else x, frozen)
    st, m = step(TrainState(trainable, opt_state), poisoned, bad, 0)
    new_t, new_opt = st.trainable, st.opt_state
    assert int(m["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new_t)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(new_opt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_indivisible_microbatches_error():
    from alm_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="grad_accum"):
        split_microbatches(make_batch(0, b=6), 4)


@pytest.mark.parametrize("block", [16, 7])
def test_blocked_cross_entropy_equals_full_logits_and_never_builds_them(block):
    """The head applied block by block (blocks without loss tokens skipped, logits recomputed in the backward)
    gives the full-logits loss and gradients, and no `[B, T, vocab]` array exists in the traced program."""
    from alm_jax.training.loss import blocked_cross_entropy
    rng = np.random.default_rng(0)
    b, t, d, vocab = 3, 50, 8, 97
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 20:31], mask[2, 45:] = 1, 1               # loss in two places; most blocks have none
    head = lambda x, w: jnp.einsum("btd,vd->btv", x, w)  # noqa: E731

    def blocked(h, w):
        return blocked_cross_entropy(h, lambda x: head(x, w), tgt, jnp.asarray(mask), block=block)[0]

    def full(h, w):
        return masked_cross_entropy(head(h, w), tgt, jnp.asarray(mask))[0]

    np.testing.assert_allclose(float(blocked(h, w)), float(full(h, w)), rtol=1e-6)
    assert float(blocked_cross_entropy(h, lambda x: head(x, w), tgt, jnp.asarray(mask), block=block)[1]) == 16
    for g1, g2 in zip(jax.grad(blocked, argnums=(0, 1))(h, w), jax.grad(full, argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-5)
    assert float(jnp.abs(jax.grad(blocked, argnums=1)(h, w)).sum()) > 0
    shapes = set()

    def walk(jx):                                      # every value's shape, inside scan / cond / remat too
        for eqn in jx.eqns:
            shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for p in eqn.params.values():
                for cand in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(cand, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))
    walk(jax.make_jaxpr(jax.grad(blocked, argnums=(0, 1)))(h, w).jaxpr)
    assert (b, block, vocab) in shapes                 # the head ran on blocks
    assert not any(len(s) == 3 and s[-1] == vocab and s[1] >= t for s in shapes), sorted(shapes)


def _one_update(lr_mults=()):
    model = TinyLM(nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10, lr_mults=lr_mults))
    step = build_train_step(graphdef, tx, loss_fn, donate=False)
    before = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    st, _ = step(TrainState(trainable, tx.init(trainable)), frozen, make_batch(0), 0)
    after = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(st.trainable)[0]}
    return {k: after[k] - before[k] for k in before}


def test_lr_mults_scale_the_updates_of_the_parameters_they_name():
    base = _one_update()
    assert set(base) == {"adapter.kernel", "adapter.bias", "head.kernel"}   # dotted names, no Variable field
    scaled = _one_update(lr_mults=(("adapter\\..*", 0.25), ("head.kernel", 0.0), ("adapter.kernel", 3.0)))
    # the first full match wins: adapter.kernel takes 0.25, not 3
    np.testing.assert_allclose(scaled["adapter.kernel"], 0.25 * base["adapter.kernel"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scaled["adapter.bias"], 0.25 * base["adapter.bias"], rtol=1e-4, atol=1e-7)
    assert not np.any(scaled["head.kernel"]) and np.any(base["head.kernel"])


@pytest.mark.parametrize("mults, needle", [((("adaptr.kernel", 0.5),), "matches no trainable parameter"),
                                           ((("adapter(", 0.5),), "not a regular expression"),
                                           ((("adapter.kernel", -1.0),), "must be >= 0")])
def test_bad_lr_mults_name_the_pattern(mults, needle):
    with pytest.raises(ConfigError, match=needle):
        _one_update(lr_mults=mults)


def test_lr_mults_read_from_a_yaml_mapping(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr_mults: {'connector\\.net\\.proj\\..*': 0.1, connector.net.queries: 0.3}\n")
    got = load_config(cfg).optim.lr_mults
    assert got == (("connector\\.net\\.proj\\..*", 0.1), ("connector.net.queries", 0.3))
    with pytest.raises(ConfigError, match=r"lr_mults\[0\]: expected 2 values"):
        load_config(cfg, ["optim.lr_mults=[[a, 1.0, 2.0]]"])


def test_schedule_warm_restarts():
    """`optim.cycles`: each cycle's last update reaches 0, the next starts at once at lr * cycle_decay**k."""
    one = make_schedule(OptimConfig(lr=2e-3, warmup_steps=10, total_steps=400))
    two = make_schedule(OptimConfig(lr=2e-3, warmup_steps=10, total_steps=400, cycles=2, cycle_decay=0.5))
    lr = lambda s, count: float(s(count))   # count = updates done before this one
    assert lr(one, 0) == lr(two, 0) == pytest.approx(2e-4)                  # warmup: 1/10 of the peak
    assert lr(two, 9) == pytest.approx(2e-3) and lr(two, 199) == pytest.approx(0.0, abs=1e-9)
    assert lr(two, 200) == pytest.approx(1e-3) and lr(two, 399) == pytest.approx(0.0, abs=1e-9)
    assert lr(two, 300) == pytest.approx(5e-4, rel=0.02)                    # half way down the second cosine
    assert lr(one, 200) == pytest.approx(0.5 * 2e-3 * (1 + np.cos(np.pi * 191 / 390)))   # one cycle: unchanged
    three = make_schedule(OptimConfig(lr=1.0, warmup_steps=1, total_steps=10, cycles=3, cycle_decay=0.5))
    assert [round(lr(three, c), 6) for c in (3, 6, 9)] == [0.5, 0.25, 0.0]     # cycles of 3, 3 and 4 updates
    for bad in ({"cycles": 0}, {"cycle_decay": 0.0}, {"cycles": 50}):
        with pytest.raises(ConfigError, match="optim.cycle"):
            make_schedule(OptimConfig(lr=1e-3, warmup_steps=10, total_steps=400, **bad))
