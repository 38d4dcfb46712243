"""LoRA inside the audio-language model: with LoRA on, one step changes exactly the connector and the
LoRA adapters; frozen LLM/encoder weights stay bit-identical and get no optimizer state."""

import jax
import numpy as np
from flax import nnx

from alm_jax.config import OptimConfig
from alm_jax.models.alm import split_trainable
from alm_jax.models.lora import apply_lora
from alm_jax.training.step import TrainState, build_train_step, make_optimizer
from test_alm import clips, loss_fn, make_batch, make_model


def test_one_step_with_lora_changes_connector_and_lora_only():
    model = make_model("alarm")
    wrapped = apply_lora(model.llm, rank=4, alpha=8.0, target_regex=r"attn/(q_proj|v_proj)", rngs=nnx.Rngs(3))
    assert len(wrapped) == 2 * model.llm.cfg.num_layers         # per layer, though the layers are scanned
    graphdef, trainable, frozen = split_trainable(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    lora = [p for p in paths if "lora_" in p]
    assert sorted(lora) == ["llm.layers.self_attn.q_proj.lora_a", "llm.layers.self_attn.q_proj.lora_b",
                            "llm.layers.self_attn.v_proj.lora_a", "llm.layers.self_attn.v_proj.lora_b"]
    assert all(p.startswith("connector.") or "lora_" in p for p in paths)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0))
    opt = tx.init(trainable)
    step = build_train_step(graphdef, tx, loss_fn, donate=False)
    batch = make_batch(model, clips(4), [[10, 11, 12]] * 4)
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    flat_before = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainable)}
    st, m = step(TrainState(trainable, opt), frozen, batch, 0)
    new_t, new_opt = st.trainable, st.opt_state
    assert int(m["skipped"]) == 0
    for a, b in zip(frozen_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    flat_after = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(new_t)}
    # lora_b starts at zero, so at step one only lora_b (not lora_a) receives a gradient; everything
    # in the connector changes.
    for p in paths:
        moved = not np.array_equal(flat_before[p], flat_after[p])
        if "lora_a" in p:
            assert not moved, p
        else:
            assert moved, p
    moments = [x for x in jax.tree.leaves(new_opt) if x.ndim > 0]
    assert len(moments) == 2 * len(paths)
