"""Beam search over the KV-cache decoder of `models/llm.py`, token for token as `transformers`
`generate(num_beams=k, do_sample=False, ...)` (its vectorized `_beam_search`, transformers 5.x), jitted with static
shapes: a prefill of the `b` prompts into the KV cache (repeated to `b * k` rows), then a `lax.while_loop` of
one-token steps over every beam.

    settings = BeamSettings(num_beams=4, max_new_tokens=200, eos_id=2, no_repeat_ngram_size=2,
                            repetition_penalty=2.0)                  # MATS's decoding
    tokens = beam_search(llm, input_ids, attention_mask, settings)   # a DecoderLM on text: [b, 200] int32
    tokens = beam_generate(alm, batch, settings)                     # the ALM on a prompt batch (models/alm.py)

Each step, as transformers does: log-softmax of the last logits `[b * k, vocab]`; the repetition penalty (every
token id seen so far in the beam's history: the log-probability * penalty when < 0, / penalty otherwise; HF applies
its `RepetitionPenaltyLogitsProcessor` to the log-softmax output in beam search); `no_repeat_ngram_size` n (a token
that would complete an n-gram already in the history gets -inf); + the beam's running score; the best
`2k` of the `k * vocab` candidates; candidates ending in `eos_id` (or reaching `max_new_tokens`) among the first `k`
become finished hypotheses scored `sum of log-probs / generated length ** length_penalty`, the best `k` unfinished
ones continue (the cache rows reordered to their parents). The loop ends as transformers' does: `early_stopping`
True = once every prompt has `k` finished hypotheses; False = once no running beam can beat the worst finished one
at its current length (HF's heuristic); "never" = the same at `max_new_tokens` when `length_penalty` > 0.

History: `beam_search(..., prompt_history=True)` counts the prompt's real tokens (padding is ignored), as
`generate(input_ids=...)` of an unpadded prompt; `prompt_history=False` and `beam_generate` count the generated
tokens only, as `generate(inputs_embeds=...)` (MATS / SALMONN decode the spliced audio + text embeddings so).

Output: the best hypothesis per prompt, `[b, max_new_tokens]` int32; positions after its EOS (kept) hold `eos_id`
(-1 without one), like `llm.greedy_decode` (`beam_decode` and `beam_search(all_hypotheses=True)`: all `num_beams`
finished hypotheses, best first, and their scores).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.layers import KVCache
from alm_jax.models.llm import DecoderLM

NEG = -1.0e9   # transformers' "very large negative" score for masked candidates and empty finished slots


@dataclasses.dataclass(frozen=True)
class BeamSettings:
    """Beam search settings (hashable: one compiled program per value). Names and meanings as transformers'
    `GenerationConfig`: `no_repeat_ngram_size` 0 = off, `repetition_penalty` 1.0 = off, `early_stopping` True |
    False | "never" (see the module docstring); `eos_id` None = rows end only at `max_new_tokens`. `num_beams` 1 runs
    this search with one beam (transformers decodes greedily then): with `early_stopping` True and no penalties
    that is greedy decoding."""
    num_beams: int = 4
    max_new_tokens: int = 64
    eos_id: int | None = None
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"beam search {name} must be an int, got {v!r}")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"beam search num_beams ({self.num_beams}) and max_new_tokens ({self.max_new_tokens}) "
                              "must be >= 1")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        for name in ("repetition_penalty", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"beam search {name} must be a finite number, got {v!r}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ConfigError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.eos_id is not None and (isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int)
                                        or self.eos_id < 0):
            raise ConfigError(f"eos_id must be a non-negative token id or None, got {self.eos_id!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Beams:
    """Search state for `b` prompts x `k` beams; sequences `[b, k, h + max_new]` int32 hold the history (h
    prompt ids, -1 = ignored) and the generated ids (-1 = not yet written)."""
    running: jax.Array          # [b, k, L] the live beams, best first
    running_scores: jax.Array   # [b, k] their summed log-probabilities (NEG-masked as transformers does)
    finished: jax.Array         # [b, k, L] the best finished hypotheses, best first
    finished_scores: jax.Array  # [b, k] length-penalized scores (NEG = empty slot)
    finished_flags: jax.Array   # [b, k] bool: the slot holds a finished hypothesis
    unsatisfied: jax.Array      # [b, 1] bool: a running beam may still beat the finished ones


def _seen_tokens(seqs: jax.Array, vocab: int) -> jax.Array:
    """`[rows, L]` ids (-1 = none) -> `[rows, vocab]` bool: the id occurs in the row."""
    col = jnp.where((seqs >= 0) & (seqs < vocab), seqs, vocab)
    seen = jnp.zeros((seqs.shape[0], vocab + 1), bool).at[jnp.arange(seqs.shape[0])[:, None], col].set(True)
    return seen[:, :vocab]


def _banned_ngram_tokens(seqs: jax.Array, length: jax.Array, n: int, vocab: int) -> jax.Array:
    """transformers' `NoRepeatNGramLogitsProcessor` on static rows: `seqs [rows, L]` whose first `length` ids
    are the history -> `[rows, vocab]` bool, the tokens that would repeat an n-gram of the history."""
    rows, width = seqs.shape
    if width < n:
        return jnp.zeros((rows, vocab), bool)
    count = width - n + 1
    windows = jnp.stack([seqs[:, j:j + count] for j in range(n)], axis=-1)            # [rows, count, n]
    prefix = jax.lax.dynamic_slice(seqs, (0, jnp.maximum(length - n + 1, 0)), (rows, n - 1))
    match = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1)                 # [rows, count]
    match &= jnp.all(prefix >= 0, axis=-1, keepdims=True) & (length >= n)
    last = windows[..., -1]
    col = jnp.where(match & (last >= 0) & (last < vocab), last, vocab)
    banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], col].set(True)
    return banned[:, :vocab]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x `[b, n, ...]`, idx `[b, m]` -> `[b, m, ...]` (transformers' `_gather_beams`)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _step(st: _Beams, logits: jax.Array, step: jax.Array, h: int, s: BeamSettings):
    """One beam step from the logits `[b * k, vocab]` of the running beams' last tokens, generating token `step`
    (0-based). Returns the new state, the parent row `[b * k]` of each new running beam (for the cache), and
    whether the search goes on (transformers' `_beam_search_has_unfinished_sequences`)."""
    b, k, width = st.running.shape
    vocab = logits.shape[-1]
    keep = min(max(2, 1 + (s.eos_id is not None)) * k, k * vocab)
    length = h + step                                    # history ids so far (prompt + generated)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    flat = st.running.reshape(b * k, width)
    if s.repetition_penalty != 1.0:
        p = s.repetition_penalty
        lp = jnp.where(_seen_tokens(flat, vocab), jnp.where(lp < 0, lp * p, lp / p), lp)
    if s.no_repeat_ngram_size > 0:
        lp = jnp.where(_banned_ngram_tokens(flat, length, s.no_repeat_ngram_size, vocab), -jnp.inf, lp)
    acc = (lp.reshape(b, k, vocab) + st.running_scores[:, :, None]).reshape(b, k * vocab)

    # top-2k continuations over every beam
    top_lp, top_idx = jax.lax.top_k(acc, keep)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather(st.running, parent)
    top_seqs = jax.lax.dynamic_update_slice(top_seqs, token[:, :, None], (0, 0, length))
    eos = (token == s.eos_id) if s.eos_id is not None else jnp.zeros_like(token, bool)
    hits = eos | (step + 1 >= s.max_new_tokens)

    # the best k unfinished continue
    run_lp = top_lp + hits.astype(jnp.float32) * NEG
    _, nxt = jax.lax.top_k(run_lp, k)
    running, running_scores, parents = _gather(top_seqs, nxt), _gather(run_lp, nxt), _gather(parent, nxt)

    # finished hypotheses among the first k candidates enter the kept k if they score higher
    generated = (step + 1).astype(jnp.float32)
    did_finish = hits & (jnp.arange(keep) < k)[None, :]
    scores = top_lp / (generated if s.length_penalty == 1.0 else generated ** s.length_penalty)
    full = jnp.all(st.finished_flags, axis=-1, keepdims=True) & (s.early_stopping is True)
    scores = scores + full.astype(jnp.float32) * NEG
    scores = scores + (~st.unsatisfied).astype(jnp.float32) * NEG
    scores = scores + (~did_finish).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([st.finished_scores, scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    finished = _gather(jnp.concatenate([st.finished, top_seqs], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    finished_flags = _gather(jnp.concatenate([st.finished_flags, did_finish], axis=1), best)

    # transformers' early-stop heuristic (after its cur_len += 1)
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_length = jnp.float32(s.max_new_tokens)
    else:
        best_length = generated
    best_length = best_length if s.length_penalty == 1.0 else best_length ** s.length_penalty
    best_running = running_scores[:, :1] / best_length
    worst_finished = jnp.where(finished_flags, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
    unsatisfied = st.unsatisfied & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
    go = jnp.any(unsatisfied) & ~(jnp.all(finished_flags) & (s.early_stopping is True)) & ~jnp.all(hits)

    rows = (parents + jnp.arange(b)[:, None] * k).reshape(b * k)
    new = _Beams(running=running, running_scores=running_scores, finished=finished, finished_scores=finished_scores,
                 finished_flags=finished_flags, unsatisfied=unsatisfied)
    return new, rows, go


def _repeat_cache(cache: KVCache, k: int) -> KVCache:
    """Each prompt row of the prefilled cache repeated for its k beams (rows b * k + j)."""
    return dataclasses.replace(cache, keys=jnp.repeat(cache.keys, k, axis=1),
                               values=jnp.repeat(cache.values, k, axis=1), valid=jnp.repeat(cache.valid, k, axis=0),
                               next_position=jnp.repeat(cache.next_position, k, axis=0))


def _reorder_cache(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache rows `rows [b * k]` (the new beams' parents), in that order."""
    return dataclasses.replace(cache, keys=jnp.take(cache.keys, rows, axis=1),
                               values=jnp.take(cache.values, rows, axis=1), valid=jnp.take(cache.valid, rows, axis=0),
                               next_position=jnp.take(cache.next_position, rows, axis=0))


def beam_decode(model: DecoderLM, inputs_embeds: jax.Array, mask: jax.Array, settings: BeamSettings,
                history: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Traceable beam search from prompt embeddings `[b, t, embed]` (left-padded, mask `[b, t]`) -> the
    `num_beams` finished hypotheses per prompt, best first, `[b, k, max_new_tokens]` int32 (after EOS: eos_id, or -1
    without one), and their scores `[b, k]` float32 (sum of log-probs / length ** length_penalty; transformers'
    `sequences_scores`). `history` `[b, h]` int32: prompt ids the repetition penalty and the n-gram rule count
    (-1 = ignored), or None (generated tokens only)."""
    s = settings
    b, t = mask.shape
    k, new = s.num_beams, s.max_new_tokens
    h = 0 if history is None else history.shape[1]
    logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=mask, cache=model.init_cache(b, t + new))
    cache = _repeat_cache(cache, k)
    seqs = jnp.full((b, k, h + new), -1, jnp.int32)
    if history is not None:
        seqs = seqs.at[:, :, :h].set(jnp.asarray(history, jnp.int32)[:, None, :])
    start = _Beams(running=seqs, running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG), finished=seqs,
                   finished_scores=jnp.full((b, k), NEG, jnp.float32), finished_flags=jnp.zeros((b, k), bool),
                   unsatisfied=jnp.ones((b, 1), bool))
    st, rows, go = _step(start, jnp.repeat(logits[:, -1], k, axis=0), jnp.int32(0), h, s)

    def unfinished(carry):
        step, _, _, _, go = carry
        return go & (step < new)

    def decode_one(carry):
        step, st, rows, cache, _ = carry
        cache = _reorder_cache(cache, rows)
        last = jax.lax.dynamic_slice_in_dim(st.running, h + step - 1, 1, axis=2).reshape(b * k, 1)
        logits, cache = model(last, cache=cache)
        st, rows, go = _step(st, logits[:, 0], step, h, s)
        return step + 1, st, rows, cache, go

    st = jax.lax.while_loop(unfinished, decode_one, (jnp.int32(1), st, rows, cache, go))[1]
    tokens = st.finished[:, :, h:]
    return jnp.where(tokens < 0, -1 if s.eos_id is None else s.eos_id, tokens), st.finished_scores


def beam_search(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None, settings: BeamSettings,
                *, prompt_history: bool = True, all_hypotheses: bool = False):
    """Beam search of a `DecoderLM` on token prompts `[b, t]` (left-padded; attention_mask `[b, t]`, 1 = token)
    -> the best answers `[b, max_new_tokens]` int32, or with `all_hypotheses` every beam's and their scores
    (`beam_decode`'s pair). `prompt_history`: the prompt's real tokens count for the repetition penalty and the
    n-gram rule (transformers' `generate(input_ids)`); False = generated tokens only."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    graphdef, state = nnx.split(model)
    tokens, scores = _beam_search(graphdef, state, input_ids, mask, settings=settings, prompt_history=prompt_history)
    return (tokens, scores) if all_hypotheses else tokens[:, 0]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("settings", "prompt_history"))
def _beam_search(graphdef, state, input_ids, mask, *, settings: BeamSettings, prompt_history: bool):
    model = nnx.merge(graphdef, state)
    history = jnp.where(mask, input_ids, -1) if prompt_history else None
    return beam_decode(model, model.embed(input_ids), mask, settings, history)


def beam_generate(model, batch: dict[str, jax.Array], settings: BeamSettings) -> jax.Array:
    """The ALM's (`models.alm.AudioLanguageModel`) beam-search answers `[B, max_new_tokens]` int32 for a
    left-padded prompt batch (the keys of `models.alm.generate`): audio + text embeddings prefilled, generated
    tokens only in the history (transformers' `generate(inputs_embeds=...)`)."""
    graphdef, state = nnx.split(model)
    return _beam_generate(graphdef, state, dict(batch), settings=settings)[0][:, 0]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("settings",))
def _beam_generate(graphdef, state, batch, *, settings: BeamSettings):
    model = nnx.merge(graphdef, state)
    return beam_decode(model.llm, model.embed_inputs(batch), batch["attention_mask"].astype(bool), settings)
