"""The batched sampler (alm_jax/generation/sampler.py): greedy and repetition-penalty decoding equal
`transformers` `generate(do_sample=False)` token for token (tiny random Llama; real SmolLM2 marked slow),
logits processing equals transformers' processors, seeded sampling is reproducible, several EOS ids and
per-row limits stop rows at the right token, the thinking budget forces its sentence + close tag, stop
strings cut decoded text, bad configs raise ConfigError."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import alm_jax
from alm_jax.errors import ConfigError
from alm_jax.generation.sampler import (PAD, SamplingConfig, generate, process_logits, sample_decode,
                                        truncate_at_stop_strings)
from hf_tiny_llm import left_padded_batch, save, tiny_hf_llm

NEW = 16
LENGTHS = [5, 11, 8]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs torch with one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF tiny Llama, our DecoderLM with the same weights, ids [3, 11], mask [3, 11], unpadded rows)."""
    hf = tiny_hf_llm("llama", seed=11)
    ours = alm_jax.load_llm(save(hf, tmp_path_factory.mktemp("llama")), dtype=jnp.float32)
    ids, mask, _, rows = left_padded_batch(np.random.default_rng(3), LENGTHS)
    return hf, ours, ids, mask, rows


@pytest.fixture(scope="module")
def free_greedy(tiny):
    """Greedy continuations of the tiny batch with no EOS: [3, NEW]."""
    _, ours, ids, mask, _ = tiny
    tokens, lengths = generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW))
    np.testing.assert_array_equal(np.asarray(lengths), [NEW] * 3)
    return np.asarray(tokens)


def _hf_generate(hf, ids, mask, **kw) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(np.asarray(ids), dtype=torch.long),
                          attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long),
                          do_sample=False, pad_token_id=0, **kw)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, kw["max_new_tokens"] - new.shape[1])), constant_values=0)


def _expected_length(row: np.ndarray, eos_ids, limit: int) -> int:
    hits = np.flatnonzero(np.isin(row[:limit], eos_ids))
    return int(hits[0]) + 1 if len(hits) else limit


def _check_rows_end(tokens, lengths, reference, eos_ids, limits):
    """Each row equals reference up to its first EOS (kept) or its limit, then PAD; lengths match."""
    for i, (row, ref) in enumerate(zip(tokens, reference)):
        n = _expected_length(ref, eos_ids, limits[i])
        assert lengths[i] == n, (i, lengths, n)
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert (row[n:] == PAD).all(), row


# ----------------------------------------------------------------------------------------------- greedy


def test_greedy_with_two_eos_ids_equals_transformers(tiny, free_greedy):
    hf, ours, ids, mask, _ = tiny
    eos_ids = (int(free_greedy[0, 5]), int(free_greedy[2, 3]))
    assert eos_ids[0] != eos_ids[1]
    cfg = SamplingConfig(max_new_tokens=NEW, eos_ids=eos_ids)
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, cfg))
    assert tokens.shape == (3, NEW) and tokens.dtype == np.int32 and lengths.dtype == np.int32
    theirs = _hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=list(eos_ids))
    _check_rows_end(tokens, lengths, theirs, eos_ids, [NEW] * 3)
    assert lengths[0] <= 6 and lengths[2] <= 4  # the EOS path really ran, at the first EOS of either id
    assert len(np.unique(free_greedy)) > 3  # not a degenerate repeat of one token


def test_repetition_penalty_greedy_equals_transformers(tiny, free_greedy):
    """HF penalizes every id in input_ids, padding included, so the reference runs each row unpadded."""
    hf, ours, ids, mask, rows = tiny
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW,
                                                                              repetition_penalty=1.3)))
    np.testing.assert_array_equal(lengths, [NEW] * 3)
    for i, row in enumerate(rows):
        theirs = _hf_generate(hf, row[None], np.ones((1, len(row))), max_new_tokens=NEW, repetition_penalty=1.3)
        np.testing.assert_array_equal(tokens[i], theirs[0])
    assert (tokens != free_greedy).any()  # the penalty changed the continuation
    # Padding is not penalized: padded with row 0's first new token, the padded rows still match.
    padded = np.where(mask.astype(bool), ids, tokens[0, 0])
    again, _ = generate(ours, padded, mask, SamplingConfig(max_new_tokens=NEW, repetition_penalty=1.3))
    np.testing.assert_array_equal(np.asarray(again), tokens)


def test_eos_ids_and_per_row_limits(tiny, free_greedy):
    _, ours, ids, mask, _ = tiny
    eos_ids = (int(free_greedy[0, 4]), int(free_greedy[1, 2]))
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW,
                                                                              eos_ids=eos_ids)))
    _check_rows_end(tokens, lengths, free_greedy, eos_ids, [NEW] * 3)
    assert lengths[0] <= 5 and lengths[1] <= 3

    limits = [2, NEW, 0]
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW),
                                               max_new_per_row=limits))
    _check_rows_end(tokens, lengths, free_greedy, (), limits)
    np.testing.assert_array_equal(lengths, limits)

    limits = [NEW, 1, 7]  # EOS and limits together: whichever comes first
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW,
                                                                              eos_ids=eos_ids),
                                               max_new_per_row=limits))
    _check_rows_end(tokens, lengths, free_greedy, eos_ids, limits)
    assert lengths[1] == 1


# --------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3, temperature=0.7, top_k=20, top_p=0.8),
                                dict(temperature=1.5, top_p=0.5), dict(top_k=3), dict(repetition_penalty=0.8)])
def test_process_logits_equals_transformers_processors(kw):
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)
    rng = np.random.default_rng(0)
    scores = (3 * rng.standard_normal((4, 128))).astype(np.float32)
    prev = rng.integers(0, 128, size=(4, 12))
    cfg = SamplingConfig(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                         top_p=kw.get("top_p", 1.0), repetition_penalty=kw.get("repetition_penalty", 1.0))
    procs = LogitsProcessorList(
        ([RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)] if cfg.repetition_penalty != 1 else [])
        + ([TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1 else [])
        + ([TopKLogitsWarper(cfg.top_k)] if cfg.top_k else []) + ([TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1 else []))
    theirs = procs(torch.as_tensor(prev), torch.as_tensor(scores)).numpy()
    seen = np.zeros((4, 128), bool)
    np.put_along_axis(seen, prev, True, axis=1)
    ours = np.asarray(process_logits(jnp.asarray(scores), jnp.asarray(seen), cfg))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6, atol=1e-6)
    assert (ours != scores).any()
    kept = np.isfinite(ours).sum(1)
    if cfg.top_k or cfg.top_p < 1:  # the filter really removed tokens, but kept more than one somewhere
        assert kept.max() > 1 and kept.max() < 128
    if cfg.top_k and cfg.top_p < 1:  # and top-p cut further than top-k
        assert kept.min() < cfg.top_k


def test_sampling_reproducible_by_seed(tiny, free_greedy):
    _, ours, ids, mask, _ = tiny
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=3)
    a, la = map(np.asarray, generate(ours, ids, mask, cfg))
    b, lb = map(np.asarray, generate(ours, ids, mask, cfg))
    c, _ = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=4)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert (a != c).any()
    assert (a != free_greedy).any()  # it really samples
    assert (a >= 0).all() and (a < 128).all()


def test_row_randomness_independent_of_batch(tiny):
    """Row 1 sampled alone (unpadded, row_ids=[1]) draws the same tokens as inside the padded batch."""
    _, ours, ids, mask, rows = tiny
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=9)
    batch, _ = generate(ours, ids, mask, cfg)
    alone, _ = generate(ours, rows[1][None], None, cfg, row_ids=[1])
    other, _ = generate(ours, rows[1][None], None, cfg, row_ids=[0])
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(batch)[1])
    assert (np.asarray(other) != np.asarray(alone)).any()  # the row id does pick the randomness


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(tiny, free_greedy, kw):
    _, ours, ids, mask, _ = tiny
    tokens, _ = generate(ours, ids, mask, SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=5, **kw))
    np.testing.assert_array_equal(np.asarray(tokens), free_greedy)


# -------------------------------------------------------------------------------------------- thinking

V = 16
OPEN, CLOSE, FORCE, EOS = (3, 4), (5, 6), (9, 10), 2


class ChainLM:
    """A fake LM with DecoderLM's call interface: the next token's logits are `table[last token]`, so each
    token deterministically prefers one successor (`chain[token]`, others 15)."""

    def __init__(self, chain: dict[int, int], sharp: float = 30.0):
        table = np.zeros((V, V), np.float32)
        for a in range(V):
            table[a, chain.get(a, 15)] = sharp
        self.table = jnp.asarray(table)
        self.cfg = types.SimpleNamespace(vocab_size=V)

    def init_cache(self, batch, max_len):
        return jnp.zeros((), jnp.int32)

    def embed(self, ids):
        return jax.nn.one_hot(ids, V)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, cache=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        logits = x @ self.table
        return logits if cache is None else (logits, cache + 1)


BASE = {1: 3, 3: 4, 6: 8, 8: 11, 11: EOS, 13: 3, 14: 7, 7: 7, 12: 5, 5: 6}
NEVER_CLOSES = {**BASE, 4: 7}       # after <think>: 7 7 7 ... forever
CLOSES_AFTER_ONE = {**BASE, 4: 12}  # after <think>: 12 </think>


def _think(chain, prompts, budget, **kw):
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, True
    cfg = SamplingConfig(max_new_tokens=NEW, eos_ids=(EOS,), think_open_ids=OPEN, think_close_ids=CLOSE,
                         think_budget=budget, budget_forcing_ids=FORCE if budget else (), **kw)
    model = ChainLM(chain)
    run = jax.jit(lambda ids, mask, key: sample_decode(model, model.embed(ids), mask, ids, cfg, key))
    tokens, lengths = run(jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    return [list(row[:n]) for row, n in zip(np.asarray(tokens), np.asarray(lengths))], np.asarray(tokens)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=2)])
def test_thinking_budget_forces_sentence_and_close(kw):
    prompts = [[1], [13, 3, 4], [14]]  # opens <think> itself / prompt ends with <think> / never thinks
    rows, tokens = _think(NEVER_CLOSES, prompts, budget=3, **kw)
    assert rows[0] == [3, 4, 7, 7, 7, 9, 10, 5, 6, 8, 11, EOS]  # 3 free tokens, forced, then normal to EOS
    assert rows[1] == [7, 7, 7, 9, 10, 5, 6, 8, 11, EOS]
    assert rows[2] == [7] * NEW
    assert (tokens[0, 12:] == PAD).all()

    rows, _ = _think(NEVER_CLOSES, prompts, budget=0, **kw)  # off: thinks until max_new_tokens
    assert rows[0] == [3, 4] + [7] * (NEW - 2) and rows[1] == [7] * NEW


def test_thinking_budget_not_forced_when_closed_in_time():
    rows, _ = _think(CLOSES_AFTER_ONE, [[1]], budget=3)  # </think> completes exactly at the budget
    assert rows[0] == [3, 4, 12, 5, 6, 8, 11, EOS]
    rows, _ = _think(CLOSES_AFTER_ONE, [[1]], budget=2)  # one token short: forced mid-way through </think>
    assert rows[0] == [3, 4, 12, 5, 9, 10, 5, 6, 8, 11, EOS]


# ------------------------------------------------------------------------------------ stop strings, config


def test_truncate_at_stop_strings():
    texts, hit = truncate_at_stop_strings(["hello</s> world", "abc", "x\nUser: y</s>", ""], ["</s>", "\nUser:", ""])
    assert texts == ["hello", "abc", "x", ""] and hit == [True, False, True, False]
    with pytest.raises(ConfigError, match="sequence of strings"):
        truncate_at_stop_strings(["a"], "</s>")


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_ids=(-1,)), "eos_ids"), (dict(think_budget=8), "think_open_ids"),
    (dict(budget_forcing_ids=(9,)), "think_budget"), (dict(think_budget=-1), "think_budget"),
    (dict(think_budget=4, think_open_ids=OPEN, think_close_ids=CLOSE, budget_forcing_ids=(EOS,), eos_ids=(EOS,)),
     "EOS"),
])
def test_bad_config_raises(kw, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**kw)


def test_token_id_beyond_vocab_raises(tiny):
    _, ours, ids, mask, _ = tiny
    assert SamplingConfig(eos_ids=[5, 7]).eos_ids == (5, 7)  # sequences are stored as tuples
    with pytest.raises(ConfigError, match="vocab_size 128"):
        generate(ours, ids, mask, SamplingConfig(max_new_tokens=4, eos_ids=(500,)))


# ------------------------------------------------------------------------------------------ real SmolLM2


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(demo_models, demo_tokenizer):
    from transformers import AutoModelForCausalLM

    tok, new = demo_tokenizer, 24
    prompts = ["What is the capital of France?", "Name three animals that live in the ocean."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tok(texts, return_tensors="np", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert len(set(mask.sum(1))) > 1  # really left-padded
    eos_ids = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    hf = AutoModelForCausalLM.from_pretrained(demo_models.llm, dtype=torch.float32).eval()
    theirs = _hf_generate(hf, ids, mask, max_new_tokens=new, eos_token_id=list(eos_ids))
    ours = alm_jax.load_llm(demo_models.llm, dtype=jnp.float32)
    tokens, lengths = map(np.asarray, generate(ours, ids, mask, SamplingConfig(max_new_tokens=new,
                                                                              eos_ids=eos_ids)))
    _check_rows_end(tokens, lengths, theirs, eos_ids, [new] * 2)
    assert all(len(tok.decode(row[:n], skip_special_tokens=True).split()) >= 3 for row, n in zip(tokens, lengths))


def test_stop_sequences_end_rows_at_the_right_token():
    """A row ends right after the token that completes a stop sequence (kept in the output, PAD after);
    other rows go on. The sequence is taken from the free greedy run, so it surely occurs."""
    from alm_jax.generation.sampler import PAD, SamplingConfig, generate
    model, ids, mask = _stop_fixture()
    free, _ = generate(model, ids, mask, SamplingConfig(max_new_tokens=12))
    free = np.asarray(free)
    seq = tuple(int(t) for t in free[0, 3:5])                       # row 0's tokens 3 and 4
    first = next(k for k in range(1, 12) if tuple(free[0, k - 1:k + 1]) == seq) + 1
    tokens, lengths = generate(model, ids, mask, SamplingConfig(max_new_tokens=12, stop_ids=(seq,)))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert lengths[0] == first and (tokens[0, :first] == free[0, :first]).all() and (tokens[0, first:] == PAD).all()
    for r in range(1, len(free)):   # a row that never completes the sequence runs to the end, unchanged
        ends = [k + 2 for k in range(11) if tuple(free[r, k:k + 2]) == seq]
        assert lengths[r] == (ends[0] if ends else 12) and (tokens[r, :lengths[r]] == free[r, :lengths[r]]).all()
    with pytest.raises(ConfigError, match="empty"):
        SamplingConfig(stop_ids=((),))


def _stop_fixture():
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.models.llm import DecoderLM, LLMConfig
    cfg = LLMConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 64, "tie_word_embeddings": False})
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    ids = jnp.asarray([[0, 5, 9, 11], [0, 0, 7, 3], [4, 2, 8, 1]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], bool)
    return model, ids, mask
