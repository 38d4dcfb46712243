"""KV-cache decoding: cached logits equal full recomputation, greedy generation equals both full
recomputation and `transformers` `generate(do_sample=False)` on the same weights, left-padded batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.models.llm import generate_greedy
from alm_jax.weights.llm_params import load_llm
from hf_tiny_llm import jit_forward, left_padded_batch, save, tiny_hf_llm

NEW = 16


@pytest.fixture(scope="module", params=[("llama", True), ("qwen3", False)], ids=["llama-scanned", "qwen3-unrolled"])
def models(request, tmp_path_factory):
    family, scan = request.param
    hf = tiny_hf_llm(family, tied=family == "llama", seed=5)
    return hf, load_llm(save(hf, tmp_path_factory.mktemp(family)), scan_layers=scan)


def test_greedy_equals_full_recompute_and_transformers(models):
    hf, model = models
    ids, mask, _, _ = left_padded_batch(np.random.default_rng(6), [7, 12])
    new = np.asarray(generate_greedy(model, ids, mask, max_new_tokens=NEW))
    assert new.shape == (2, NEW) and new.dtype == np.int32

    # Full recomputation: one fixed-width buffer; the causal mask hides the not-yet-filled tail.
    forward = jit_forward(model)
    buffer = np.concatenate([ids, np.zeros((2, NEW), np.int32)], 1)
    full_mask = np.concatenate([mask, np.ones((2, NEW), np.int32)], 1)
    for step in range(NEW):
        logits = forward(buffer, full_mask)
        buffer[:, ids.shape[1] + step] = logits[:, ids.shape[1] + step - 1].argmax(-1)
    np.testing.assert_array_equal(new, buffer[:, ids.shape[1]:])

    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    np.testing.assert_array_equal(new, ref[:, ids.shape[1]:].numpy())
    assert len(np.unique(new)) > 2  # not a degenerate repeat of one token


def test_cached_logits_equal_full_forward(models):
    """Prefill (left-padded) then one token at a time, teacher-forced: every step's logits match."""
    _, model = models
    ids, mask, _, _ = left_padded_batch(np.random.default_rng(7), [9, 5])
    cont = np.random.default_rng(8).integers(0, 128, size=(2, 6)).astype(np.int32)
    full = jit_forward(model)(np.concatenate([ids, cont], 1), np.concatenate([mask, np.ones_like(cont)], 1))

    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, tokens, tmask, cache: nnx.merge(graphdef, state)(tokens, attention_mask=tmask,
                                                                                  cache=cache))
    cache = model.init_cache(2, ids.shape[1] + cont.shape[1])
    logits, cache = step(state, ids, mask, cache)
    assert np.abs(np.asarray(logits) - full[:, :ids.shape[1]])[mask.astype(bool)].max() <= 1e-5
    for i in range(cont.shape[1]):
        logits, cache = step(state, cont[:, i:i + 1], np.ones((2, 1), np.int32), cache)
        assert np.abs(np.asarray(logits[:, 0]) - full[:, ids.shape[1] + i]).max() <= 1e-5
    assert int(cache.end) == ids.shape[1] + cont.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(1) + cont.shape[1])


def test_eos_stops_and_fills(models):
    _, model = models
    ids, mask, _, _ = left_padded_batch(np.random.default_rng(6), [7, 12])
    free = np.asarray(generate_greedy(model, ids, mask, max_new_tokens=NEW))
    eos = int(free[0, 3])
    first = int(np.argmax(free[0] == eos))
    stopped = np.asarray(generate_greedy(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW, eos_id=eos))
    np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first:] == eos).all()
    row1_stop = np.argmax(free[1] == eos) if (free[1] == eos).any() else NEW
    np.testing.assert_array_equal(stopped[1, :row1_stop], free[1, :row1_stop])


def test_scanned_and_unrolled_decode_alike(tmp_path):
    """Same weights, both layer-stack forms: the same stacked cache contents and the same greedy tokens."""
    path = save(tiny_hf_llm("qwen3", seed=9), tmp_path)
    ids, mask, _, _ = left_padded_batch(np.random.default_rng(9), [6, 4])
    caches, tokens = [], []
    for scan in (True, False):
        model = load_llm(path, scan_layers=scan)
        graphdef, state = nnx.split(model)
        prefill = jax.jit(lambda st, i, m, c: nnx.merge(graphdef, st)(i, attention_mask=m, cache=c))
        _, cache = prefill(state, ids, mask, model.init_cache(2, 10))
        assert cache.keys.shape == (2, 2, 10, 2, 24)      # [layers, batch, max_len, kv_heads, head_dim]
        caches.append(cache)
        tokens.append(np.asarray(generate_greedy(model, ids, mask, max_new_tokens=6)))
    for a, b in ((caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
        assert np.abs(np.asarray(a)[:, :, 6:]).max() == 0     # slots past the prompt are still empty
    np.testing.assert_array_equal(tokens[0], tokens[1])
