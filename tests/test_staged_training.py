"""Staged training (ALARM-CA / ALARM-P): `model.init_from` copies a single-encoder run's adapter into a fused model,
`model.freeze` holds it fixed (no gradient, no optimizer state, saved with the trained parameters), and
`model.frozen_mode` decides whether its BatchNorm runs on running statistics (eval) or, as ALARM's public code,
on batch statistics with its running ones updated (train)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_alm import clips, make_batch, make_model, tiny_encoder, tiny_llm

from alm_jax.config import ConnectorConfig, EncoderConfig, InitFromConfig, ModelConfig, OptimConfig
from alm_jax.errors import ConfigError
from alm_jax.models.alm import AudioLanguageModel, split_trainable
from alm_jax.training.checkpoint import save_trained
from alm_jax.training.staged import apply_freeze, init_from_runs, split_fixed
from alm_jax.training.step import TrainState, build_train_step, make_optimizer, split_model_state

FREEZE = ModelConfig(freeze=("connector.adapters.*",))


def _single(taps=(1, 2), seed=3) -> AudioLanguageModel:
    """A single-encoder ALARM model (BatchNorm adapter) whose adapter weights and statistics are all non-initial."""
    model = AudioLanguageModel([tiny_encoder(seed=1)], tiny_llm(seed), ConnectorConfig(
        kind="alarm", adapter_dim=32, adapters=("batch",)), [EncoderConfig(taps=taps, tap_indexing="hf",
                                                                            pad_to_seconds=None)],
        rngs=nnx.Rngs(seed))
    r = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model.connector, nnx.Any(nnx.Param, nnx.BatchStat))):
        var.set_value(jnp.asarray(np.abs(r.normal(size=var.shape)) + 0.5, var.dtype))
    return model


@pytest.fixture(scope="module")
def fused():
    """A tiny ALARM-CA model (BatchNorm Whisper adapter, LayerNorm second adapter); tests take `nnx.clone`s."""
    return make_model("alarm_ca")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """A single-encoder run's trained-only checkpoint (step 5) and its model."""
    root = tmp_path_factory.mktemp("single")
    model = _single()
    save_trained(model, root / "ckpt", 5)
    return root / "ckpt", model


def _flat(module, filt=nnx.Any(nnx.Param, nnx.BatchStat)) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, filt))}


def test_init_from_copies_a_run_adapter_into_the_fused_model_strictly(fused, single_run, tmp_path):
    run, single = single_run
    ca = nnx.clone(fused)                  # adapters: BatchNorm (Whisper) and LayerNorm (second encoder)
    before = _flat(ca)
    spec = InitFromConfig(run=str(run), map=(("connector.adapters.0", "connector.adapters.0"),))
    lines = init_from_runs(ca, [spec])
    assert len(lines) == 1 and "step 5" in lines[0]
    want, got = _flat(single.connector.adapters[0]), _flat(ca.connector.adapters[0])
    assert want.keys() == got.keys() and any(k.endswith("mean") for k in got)   # BatchNorm statistics too
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    after = _flat(ca)
    untouched = [k for k in after if not k.startswith("connector.adapters.0")]
    assert untouched and all(np.array_equal(after[k], before[k]) for k in untouched)

    def refused(match, *maps, run=str(run)):
        with pytest.raises(ConfigError, match=match):
            init_from_runs(ca, [InitFromConfig(run=run, map=maps)])
    refused(r"init_from\.0.*not in the run.*norm1\.mean", ("connector.adapters.0", "connector.adapters.1"))
    refused(r"'connector\.adapter' names nothing", ("connector.adapters.0", "connector.adapter"))
    refused(r"init_from\.0\.run=.*missing holds no finished checkpoint", ("connector.adapters.0", "connector.adapters.0"),
            run=str(tmp_path / "missing"))
    refused(r"map is empty")
    save_trained(_single(taps=(0, 1, 2)), tmp_path / "three", 1)
    refused(r"layer_average\.weights of .* has shape \(3,\), but connector\.adapters\.0\.layer_average\.weights "
            r"here is \(2,\)", ("connector.adapters.0", "connector.adapters.0"), run=str(tmp_path / "three"))


def test_freeze_splits_the_learned_state_and_sets_the_frozen_modules_mode(fused):
    ca = nnx.clone(fused)
    filt = apply_freeze(ca, FREEZE)
    assert ca.connector.adapters[0].norm1.use_running_average is True          # eval mode: running statistics
    assert all(not getattr(m, "deterministic", False) for p, m in nnx.iter_graph(ca.connector.fusion)
               if isinstance(m, nnx.Dropout))                                  # the fusion keeps training mode
    _, learned, _ = split_trainable(ca)
    trained, fixed = split_fixed(learned, filt)
    names = lambda s: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(s)}   # noqa: E731
    assert names(fixed) and all(n.startswith("connector.adapters.") for n in names(fixed))
    assert not any(n.startswith("connector.adapters.") for n in names(trained))
    assert names(fixed) | names(trained) == names(learned)
    # the checkpoint form holds every learned parameter; reading it back splits them again
    state = TrainState(trained, {"m": jnp.zeros(())}, nnx.State({}), fixed)
    saved = state.as_dict()
    assert names(saved["trainable"]) == names(learned)
    back = TrainState.from_dict(saved, fixed=fixed)
    assert names(back.trainable) == names(trained) and names(back.fixed) == names(fixed)

    kept = nnx.clone(fused)
    apply_freeze(kept, ModelConfig(freeze=("connector.adapters.0",), frozen_mode="train"))
    assert kept.connector.adapters[0].norm1.use_running_average is False       # ALARM's: gradients off only
    with pytest.raises(ConfigError, match=r"model\.freeze\.0='connector\.adaptors\.\*' names no learned"):
        apply_freeze(nnx.clone(fused), ModelConfig(freeze=("connector.adaptors.*",)))
    with pytest.raises(ConfigError, match="freezes every learned parameter"):
        apply_freeze(nnx.clone(fused), ModelConfig(freeze=("connector",)))


def test_a_frozen_adapter_gets_no_update_and_its_batchnorm_follows_the_mode(fused):
    """One train step of ALARM-CA with the adapters frozen (eval mode): their parameters come back bit-identical and
    have no optimizer state, their BatchNorm statistics too; the fusion moves. In train mode (ALARM's code) a
    training forward moves the frozen BatchNorm's statistics."""
    ca = nnx.clone(fused)
    filt = apply_freeze(ca, FREEZE)
    graphdef, learned, frozen = split_trainable(ca)
    trained, fixed = split_fixed(learned, filt)
    frozen, model_state = split_model_state(frozen)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10))
    opt = tx.init(trained)
    assert not any("adapters" in ".".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(opt)[0])
    step = build_train_step(graphdef, tx, _loss, donate=False)
    batch = make_batch(ca, clips(2, seed=4), [[5, 6, 7], [8, 9]])
    new, metrics = step(TrainState(trained, opt, model_state, fixed), frozen, batch, 0)
    assert np.isfinite(float(metrics["loss"]))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert same(new.fixed, fixed)
    assert not same(new.trainable, trained)
    stats = lambda s: nnx.filter_state(s, nnx.BatchStat)   # noqa: E731
    assert jax.tree.leaves(stats(model_state)) and same(stats(new.model_state), stats(model_state))

    kept = nnx.clone(fused)
    apply_freeze(kept, ModelConfig(freeze=FREEZE.freeze, frozen_mode="train"))
    start = _flat(kept.connector.adapters[0], nnx.BatchStat)
    nnx.jit(lambda m, b: m(b))(kept, batch)   # a training-mode forward
    moved = _flat(kept.connector.adapters[0], nnx.BatchStat)
    assert start.keys() == moved.keys() and all(not np.array_equal(start[k], moved[k]) for k in start)


def _loss(model, batch):
    from alm_jax.training.step import masked_cross_entropy
    s, n = masked_cross_entropy(model(batch), batch["targets"], batch["loss_mask"])
    return s, n, {}


@pytest.mark.slow
def test_staged_run_starts_from_the_single_encoder_run_and_resumes_from_its_own_checkpoint(tiny, tmp_path):
    """ALARM-CA trained from a single-encoder run's adapter (both streams), frozen: the fused run's checkpoints hold
    the adapter unchanged (weights and statistics) without optimizer state; a resumed fused run needs only its own
    checkpoint (the first run is gone) and ends as the uninterrupted one."""
    import json

    import orbax.checkpoint as ocp
    from tiny_setup import tiny_config

    from alm_jax.config import to_dict
    from alm_jax.training.trainer import train
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    enc = f"{{path: {paths['whisper']}, taps: [0, 1], tap_indexing: hf, pad_to_seconds: null}}"
    common = ("model.connector.adapter_dim=16", "model.connector.fusion_heads=4", "model.connector.dropout=0.1",
              "data.max_text_tokens=64", "optim.warmup_steps=1", "steps=2", "optim.total_steps=2",
              "checkpoint.every=1")
    first = tiny_config(paths, tmp_path / "single", "model.connector.kind=alarm", "model.connector.adapters=[batch]",
                        f"model.encoders=[{enc}]", *common)
    single = build_alm(first.model)   # what a single-encoder run learned: every adapter weight and statistic moved
    r = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(single.connector, nnx.Any(nnx.Param, nnx.BatchStat))):
        var.set_value(jnp.asarray(np.abs(r.normal(size=var.shape)) + 0.5, var.dtype))
    source = tmp_path / "single" / "ckpt"
    save_trained(single, source, 2, to_dict(first))
    fused = ("model.connector.kind=alarm_ca", "model.connector.adapters=[batch, batch]", f"model.encoders=[{enc}, {enc}]",
             f"model.init_from=[{{run: {source}, map: {{connector.adapters.0: connector.adapters.0}}}},"
             f" {{run: {source}, map: {{connector.adapters.0: connector.adapters.1}}}}]",
             "model.freeze=[connector.adapters.*]", *common)
    whole = train(tiny_config(paths, tmp_path / "whole", *fused))
    split = tiny_config(paths, tmp_path / "split", *fused)
    train(split, stop_after=1)
    shutil.move(tmp_path / "single", tmp_path / "gone")    # a resumed run reads its own checkpoint only
    resumed = train(split)
    assert resumed.losses == {2: whole.losses[2]}

    read = lambda run, step: ocp.StandardCheckpointer().restore(run / "ckpt" / str(step) / "state")  # noqa: E731
    stage1 = read(tmp_path / "gone", 2)
    a, b = read(tmp_path / "whole", 2), read(tmp_path / "split", 2)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for i in ("0", "1"):
        held = a["trainable"]["connector"]["adapters"][i]
        for mod, ws in stage1["trainable"]["connector"]["adapters"]["0"].items():
            for w in ws:
                np.testing.assert_array_equal(held[mod][w]["value"], ws[w]["value"])
        for mod, ws in stage1["model_state"]["connector"]["adapters"]["0"].items():   # eval mode: not updated
            for w in ws:
                np.testing.assert_array_equal(a["model_state"]["connector"]["adapters"][i][mod][w]["value"],
                                              ws[w]["value"])
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a["opt_state"])[0]]
    assert any("fusion" in p for p in opt_paths) and not any("adapters" in p for p in opt_paths)
