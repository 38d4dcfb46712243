"""Cross-entropy over the vocabulary computed only where it counts: the LLM head applied one block of
positions at a time, blocks without a loss token skipped, each block's logits recomputed in the backward
pass instead of stored.

The full logits `[B, T, vocab]` of a step are the largest activation of a frozen-LLM ALM step (Llama-3.1's
128k vocabulary x 364 tokens x 96 rows is 18 GB in float32) and, at the prompt positions (audio, system
prompt, instruction), wasted work: only the answer carries loss. Blocks run the positions of every row
together, so a block is skipped when no row of the batch has a loss token there (under batch sharding the
test is one global flag per block).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LOSS_BLOCK = 32   # positions per block of the head


def blocked_cross_entropy(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
                          mask: jax.Array, block: int = LOSS_BLOCK) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies where `mask` is 1 and the token count, float32 — the same numbers as
    `step.masked_cross_entropy(logits_fn(hidden), targets, mask)` up to summation order.

    hidden `[B, T, d]` (the LLM's final normed states), logits_fn `[B, n, d] -> [B, n, vocab]`, targets
    `[B, T]` int, mask `[B, T]`. The time axis is cut into blocks of `block` positions (padded with
    mask 0), scanned; a block runs the head only when some row has a loss token in it.
    """
    b, t, d = hidden.shape
    n = -(-t // block)
    pad = n * block - t

    def blocks(x):   # [B, T, ...] -> [n, B, block, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)

    mask = mask.astype(jnp.float32)

    @jax.checkpoint      # keep only the block's inputs for the backward pass; recompute its logits there
    def block_loss(h, tgt, m):
        def head():
            logits = logits_fn(h).astype(jnp.float32)
            picked = jnp.take_along_axis(logits, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
            return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * m)
        return jax.lax.cond(jnp.any(m > 0), head, lambda: jnp.zeros((), jnp.float32))

    def body(total, xs):
        return total + block_loss(*xs), None

    with jax.named_scope("loss_head"):
        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (blocks(hidden), blocks(targets), blocks(mask)))
    return total, jnp.sum(mask)
