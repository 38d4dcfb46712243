"""Batched token sampling for a decoder LM: greedy or temperature / top-k / top-p sampling with an HF-style
repetition penalty, several EOS ids, per-row length limits and a thinking budget (budget forcing).

    cfg = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, eos_ids=(2, 0), seed=1)
    tokens, lengths = generate(model, input_ids, attention_mask, cfg)   # [b, 64] int32, [b] int32

`sample_decode` is the traceable core (prefill into a KV cache, then a `lax.while_loop` of one-token steps,
static shapes, like `models.llm.greedy_decode`); other modalities call it with spliced `inputs_embeds`.

Logits processing (`process_logits`) follows `transformers` `generate`, in its order: repetition penalty
(every token id present in the prompt or emitted so far: logit / penalty if > 0, * penalty otherwise),
then, when sampling, temperature, top-k (keep logits >= the k-th largest), top-p (HF's rule: drop the
ascending-sorted tokens whose cumulative probability is <= 1 - top_p, always keep the best one).
temperature == 0 is greedy (argmax of the penalized logits); top_k / top_p are then ignored.

Output: `tokens [b, max_new_tokens]` int32 and `lengths [b]` int32 (tokens written per row). A row stops
after any of `eos_ids` (the EOS token is kept and counted in `lengths`), after emitting one of the
`stop_ids` sequences (kept too; stop strings are tokenized into these by the caller, and
`truncate_at_stop_strings` then cuts the decoded text), or after its own maximum; every
position at or after `lengths[row]` holds `PAD = -1`. The loop ends early once every row is done.

Randomness: the token at step s of a row comes from `fold_in(fold_in(key, row_id), s)`, with `row_ids`
defaulting to the batch index. So the same key gives the same tokens, and a row with the same prompt and
the same row id draws the same randomness whatever else is in the batch (its logits may still differ by
float rounding between batch shapes / paddings, which can flip a near-tied draw).

Thinking budget (`think_budget > 0`): per row, a window of the last tokens (the prompt's tail, then emitted
ones) detects the completed `think_open_ids`; that starts a thinking span (a later open tag inside the span
does not restart it). Once `think_budget` tokens have been emitted after the open tag without the
`think_close_ids` completing, the next tokens are forced: `budget_forcing_ids + think_close_ids`, one per
step, from a per-row pointer into that fixed sequence. Then sampling continues normally; a later open tag
starts a new span with a fresh budget. Forced tokens are part of the output, count for the repetition
penalty and consume no randomness that the sampled tokens depend on (keys are per step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError

PAD = -1  # fills every output position at or after a row's length


def _id_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        ids = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a tuple of token ids, got {value!r}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ConfigError(f"{name} must hold non-negative int token ids, got {value!r}")
    return ids


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens (see the module docstring). Hashable: `generate` compiles once per config (the
    seed excepted). Token-id fields accept any sequence (or one int) and are stored as tuples."""
    max_new_tokens: int = 64
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    eos_ids: tuple[int, ...] = ()
    seed: int = 0
    think_open_ids: tuple[int, ...] = ()
    think_close_ids: tuple[int, ...] = ()
    think_budget: int = 0           # 0 = off
    budget_forcing_ids: tuple[int, ...] = ()
    stop_ids: tuple[tuple[int, ...], ...] = ()   # token sequences that end a row (kept in the output)

    def __post_init__(self):
        stops = self.stop_ids
        if isinstance(stops, (list, tuple)) and stops and all(isinstance(x, int) for x in stops):
            stops = (stops,)     # one sequence given flat
        object.__setattr__(self, "stop_ids", tuple(_id_tuple("stop_ids", seq) for seq in stops))
        if any(not seq for seq in self.stop_ids):
            raise ConfigError("stop_ids must not hold an empty sequence; drop it")
        for name in ("eos_ids", "think_open_ids", "think_close_ids", "budget_forcing_ids"):
            object.__setattr__(self, name, _id_tuple(name, getattr(self, name)))
        for name in ("max_new_tokens", "top_k", "seed", "think_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an int, got {v!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.think_budget < 0:
            raise ConfigError(f"think_budget must be >= 0 (0 = off), got {self.think_budget}")
        if self.think_budget > 0:
            if not self.think_open_ids or not self.think_close_ids:
                raise ConfigError("think_budget > 0 needs think_open_ids and think_close_ids (the token ids of "
                                  "'<think>' and '</think>'); set both, or think_budget=0")
            bad = set(self.eos_ids) & set(self.budget_forcing_ids + self.think_close_ids)
            if bad:
                raise ConfigError(f"budget_forcing_ids / think_close_ids contain EOS ids {sorted(bad)}: a forced "
                                  "sequence would end the row; remove them from one of the two")
        elif self.budget_forcing_ids:
            raise ConfigError("budget_forcing_ids is set but think_budget is 0; set think_budget > 0 "
                              "or drop budget_forcing_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def forced_ids(self) -> tuple[int, ...]:
        """The sequence forced once a thinking budget is spent: budget_forcing_ids + think_close_ids."""
        return self.budget_forcing_ids + self.think_close_ids

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ConfigError if a configured token id is outside `[0, vocab_size)`."""
        for name in ("eos_ids", "think_open_ids", "think_close_ids", "budget_forcing_ids"):
            big = [i for i in getattr(self, name) if i >= vocab_size]
            if big:
                raise ConfigError(f"{name} {big} are not below the model's vocab_size {vocab_size}; "
                                  "use the model's own tokenizer ids")


def process_logits(logits: jax.Array, seen: jax.Array | None, cfg: SamplingConfig) -> jax.Array:
    """logits `[b, vocab]` -> processed float32 logits `[b, vocab]` (removed tokens are -inf).

    seen `[b, vocab]` bool (token present in prompt or output; None = none); applies the repetition penalty,
    then (unless greedy) temperature, top-k and top-p, exactly as `transformers`' processors do.
    """
    logits = logits.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0 and seen is not None:
        p = cfg.repetition_penalty
        logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    vocab = logits.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)                       # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = (cum <= 1.0 - cfg.top_p).at[:, -1].set(False)
        rows = jnp.arange(logits.shape[0])[:, None]
        drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _ends_with(window: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    """window `[b, L]` -> `[b]` bool: the last len(ids) entries equal ids."""
    n = len(ids)
    return jnp.all(window[:, window.shape[1] - n:] == jnp.asarray(ids, jnp.int32)[None], axis=1)


def sample_decode(model, inputs_embeds: jax.Array, mask: jax.Array, prompt_ids: jax.Array | None,
                  cfg: SamplingConfig, key: jax.Array, max_new_per_row: jax.Array | None = None,
                  row_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Traceable sampling from prompt embeddings. Returns (tokens `[b, max_new_tokens]` int32, PAD after
    each row's end; lengths `[b]` int32).

    inputs_embeds `[b, t, embed]`, left-padded (mask `[b, t]` bool, True = token); prompt_ids `[b, t]` int32
    (same positions; padding ignored via mask) feed the repetition penalty and the thinking-tag window
    (None: only emitted tokens count); key: a PRNG key; max_new_per_row `[b]` int32 (clipped to
    [0, max_new_tokens]; None = max_new_tokens); row_ids `[b]` int32 identify rows for their randomness
    (None = arange(b)). `model` needs `init_cache(b, len)` and `model(ids [b, 1], cache=) -> (logits, cache)`
    / `model(inputs_embeds=, attention_mask=, cache=)`, like `DecoderLM`.
    """
    b, t = mask.shape
    n = cfg.max_new_tokens
    mask = mask.astype(bool)
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab_size is not None:
        cfg.check_vocab(vocab_size)
    limit = (jnp.full((b,), n, jnp.int32) if max_new_per_row is None
             else jnp.clip(jnp.asarray(max_new_per_row, jnp.int32), 0, n))
    row_ids = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
    rows = jnp.arange(b)
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)
    use_penalty = cfg.repetition_penalty != 1.0
    use_think = cfg.think_budget > 0
    use_stops = bool(cfg.stop_ids)
    forced_seq = jnp.asarray(cfg.forced_ids if use_think else (0,), jnp.int32)

    logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=mask, cache=model.init_cache(b, t + n))
    logits = logits[:, -1]

    state = dict(step=jnp.int32(0), token=jnp.zeros((b,), jnp.int32), out=jnp.full((b, n), PAD, jnp.int32),
                 lengths=jnp.zeros((b,), jnp.int32), done=limit <= 0)
    if use_penalty:
        seen = jnp.zeros((b, logits.shape[-1]), bool)
        if prompt_ids is not None:
            cols = jnp.where(mask, jnp.asarray(prompt_ids, jnp.int32), logits.shape[-1])  # padding: dropped
            seen = seen.at[rows[:, None], cols].set(True, mode="drop")
        state["seen"] = seen
    if use_stops:
        state["stop_window"] = jnp.full((b, max(map(len, cfg.stop_ids))), PAD, jnp.int32)
    if use_think:
        width = max(len(cfg.think_open_ids), len(cfg.think_close_ids))
        window = jnp.full((b, width), PAD, jnp.int32)
        if prompt_ids is not None:
            tail = jnp.where(mask, jnp.asarray(prompt_ids, jnp.int32), PAD)[:, -width:]
            window = window.at[:, width - tail.shape[1]:].set(tail)
        state.update(window=window, thinking=_ends_with(window, cfg.think_open_ids) & ~state["done"],
                     count=jnp.zeros((b,), jnp.int32), force_idx=jnp.full((b,), -1, jnp.int32))

    def emit(state, logits):
        """Pick one token per row from logits `[b, vocab]`, write it at `step`, advance the row states."""
        step, done = state["step"], state["done"]
        processed = process_logits(logits, state.get("seen"), cfg)
        if cfg.greedy:
            token = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        else:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            token = jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)
        if use_think:
            forcing = state["force_idx"] >= 0
            token = jnp.where(forcing, forced_seq[jnp.maximum(state["force_idx"], 0)], token)
        active = ~done
        token = jnp.where(active, token, PAD)
        new = dict(state, step=step + 1, token=token,
                   out=jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, step)),
                   lengths=state["lengths"] + active.astype(jnp.int32))
        hit_eos = jnp.any(token[:, None] == eos[None], axis=1) if cfg.eos_ids else jnp.zeros((b,), bool)
        new["done"] = done | hit_eos | (new["lengths"] >= limit)
        if use_stops:   # a row ends once its emitted tokens end with a stop sequence
            window = jnp.where(active[:, None], jnp.concatenate([state["stop_window"][:, 1:], token[:, None]], 1),
                               state["stop_window"])
            hit = jnp.zeros((b,), bool)
            for seq in cfg.stop_ids:
                hit = hit | _ends_with(window, seq)
            new.update(stop_window=window, done=new["done"] | (hit & active))
        if use_penalty:
            new["seen"] = state["seen"].at[rows, jnp.where(active, token, processed.shape[-1])].set(True, mode="drop")
        if use_think:
            window = jnp.where(active[:, None], jnp.concatenate([state["window"][:, 1:], token[:, None]], 1),
                               state["window"])
            opened, closed = _ends_with(window, cfg.think_open_ids), _ends_with(window, cfg.think_close_ids)
            was_thinking = state["thinking"]
            count = jnp.where(was_thinking, state["count"] + 1, 0)  # tokens emitted since the open tag
            thinking = (was_thinking | opened) & ~closed
            idx = jnp.where(forcing, state["force_idx"] + 1, -1)
            idx = jnp.where(idx >= len(cfg.forced_ids), -1, idx)
            start = thinking & ~forcing & (count >= cfg.think_budget)
            idx = jnp.where(start, 0, idx)
            new.update(window=window, thinking=jnp.where(active, thinking, was_thinking),
                       count=jnp.where(active, count, state["count"]), force_idx=jnp.where(active, idx, -1))
        return new

    def unfinished(state):
        return (state["step"] < n) & ~jnp.all(state["done"])

    def decode_one(state):
        logits, cache = model(jnp.maximum(state["token"], 0)[:, None], cache=state["cache"])
        return dict(emit(state, logits[:, 0]), cache=cache)

    state = dict(emit(state, logits), cache=cache)
    state = jax.lax.while_loop(unfinished, decode_one, state)
    return state["out"], state["lengths"]


def generate(model, input_ids, attention_mask, cfg: SamplingConfig, *, max_new_per_row=None,
             row_ids=None) -> tuple[jax.Array, jax.Array]:
    """Jitted `sample_decode` over token ids `[b, t]` (left-padded; attention_mask `[b, t]`, 1 = token, None =
    all tokens) with `key = jax.random.key(cfg.seed)`. Returns (tokens `[b, max_new_tokens]` int32, lengths
    `[b]` int32). Compiles once per (shapes, config without its seed)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    b = input_ids.shape[0]
    limit = jnp.full((b,), cfg.max_new_tokens, jnp.int32) if max_new_per_row is None else \
        jnp.asarray(max_new_per_row, jnp.int32)
    rows = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    if limit.shape != (b,) or rows.shape != (b,):
        raise ConfigError(f"max_new_per_row and row_ids must have shape ({b},), one per row; got "
                          f"{limit.shape} and {rows.shape}")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, mask, limit, rows, jax.random.key(cfg.seed),
                     cfg=dataclasses.replace(cfg, seed=0))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("cfg",))
def _generate(graphdef, state, input_ids, mask, limit, rows, key, *, cfg: SamplingConfig):
    model = nnx.merge(graphdef, state)
    return sample_decode(model, model.embed(input_ids), mask, input_ids, cfg, key, limit, rows)


def truncate_at_stop_strings(texts: list[str], stops: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Cut each text before the earliest occurrence of any stop string (host side, on decoded text).
    Returns (texts, hit) where hit[i] says a stop string was found in texts[i]. Empty stops are ignored."""
    if isinstance(stops, str):
        raise ConfigError(f"stops must be a sequence of strings, not one string {stops!r}; wrap it: [{stops!r}]")
    stops = [s for s in stops if s]
    out, hit = [], []
    for text in texts:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        out.append(text if cut < 0 else text[:cut])
        hit.append(cut >= 0)
    return out, hit
