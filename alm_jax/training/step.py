"""The pure training step: token-mean cross-entropy, gradients of the trainable subset only, gradient
accumulation by `lax.scan` over microbatches, AdamW with warmup + cosine and global-norm clipping, and a
non-finite guard that skips the update instead of corrupting the parameters.

The model is split once into `(graphdef, trainable, frozen)` with an nnx filter; only `trainable` gets
gradients and optimizer state, so frozen weights cost no optimizer memory and no weight-gradient FLOPs.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from alm_jax.config import OptimConfig
from alm_jax.errors import ConfigError
from alm_jax.models.alm import RUNNING_STATE
from alm_jax.training.checkpoint import key_name
from alm_jax.training.loss import blocked_cross_entropy

Batch = dict[str, jax.Array]
# loss_fn(model, batch) -> (sum of per-token losses, number of loss tokens, aux metrics dict)
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict]]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies where `mask` is 1, and the token count, in float32.

    logits `[batch, time, vocab]`, targets `[batch, time]` int (the next token of each position),
    mask `[batch, time]` (1 on assistant tokens and EOS).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def alm_loss(model, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
    """The ALM's loss (a `LossFn`): token-summed cross-entropy of the model's logits over the loss mask, and
    the token count; the vocabulary head runs only on blocks of positions with loss tokens (`loss.py`)."""
    s, n = blocked_cross_entropy(model.hidden(batch), model.llm.logits, batch["targets"], batch["loss_mask"])
    return s, n, {}


@struct.dataclass
class TrainState:
    """What a training step updates: the trainable parameters (connector + LoRA, an `nnx.State`), their
    optimizer state, and `model_state`, what a training forward updates (`models.alm.RUNNING_STATE`: BatchNorm
    running statistics, used in eval mode, and dropout RNG counters, so each step draws new masks and a resumed
    run draws the same ones; an empty State when the model has neither), and `fixed`, the learned parameters
    `model.freeze` holds fixed (`training/staged.py`: no gradient, no optimizer state; None or empty without).
    Frozen weights travel separately (never donated, never saved)."""
    trainable: Any
    opt_state: Any
    model_state: Any = None
    fixed: Any = None

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed form: `{"trainable", "opt_state"}`, plus `"model_state"` when there is one (so runs
        without BatchNorm keep the layout older checkpoints have). `trainable` holds every learned parameter:
        the fixed ones are saved with the trained ones (what eval and export read); `opt_state` covers only
        the trained ones."""
        trainable = nnx.merge_state(self.trainable, self.fixed) if has_leaves(self.fixed) else self.trainable
        out = {"trainable": trainable, "opt_state": self.opt_state}
        if has_leaves(self.model_state):
            out["model_state"] = self.model_state
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], model_state: Any = None, fixed: Any = None) -> "TrainState":
        """The inverse of `as_dict`; `model_state` when `d` has none (an empty State). `fixed`: a state with the
        fixed parameters' paths (this run's), which are taken out of `d["trainable"]` again."""
        trainable = d["trainable"]
        if has_leaves(fixed):
            names = {tuple(p) for p, _ in nnx.to_flat_state(fixed)}
            fixed, trainable = nnx.filter_state(trainable, lambda path, _: tuple(path) in names, ...)
        return cls(trainable, d["opt_state"], d.get("model_state", model_state), fixed)


def has_leaves(tree: Any) -> bool:
    return tree is not None and bool(jax.tree.leaves(tree))


def split_model_state(frozen):
    """`(frozen without running state, model_state)`: the `models.alm.RUNNING_STATE` variables of a frozen-side
    state (what `models.alm.split_trainable` returns: BatchNorm statistics, dropout RNG counters) go to the
    train state, the rest stays frozen."""
    model_state, rest = nnx.filter_state(frozen, RUNNING_STATE, ...)
    return rest, model_state


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`; with `cycles` > 1
    the cosine restarts (SGDR): `total_steps` split into `cycles` equal cycles (the last takes the remainder),
    cycle k starting at once at `lr * cycle_decay**k` with no second warmup (Adam's moments are warm).

    Step k (0-based) uses the rate of k + 1, so the first update already moves the parameters
    (lr / warmup_steps) instead of being a wasted zero-rate step."""
    warmup = max(cfg.warmup_steps, 1)
    if cfg.cycles < 1 or not 0 < cfg.cycle_decay <= 1:
        raise ConfigError(f"optim.cycles={cfg.cycles} must be >= 1 and optim.cycle_decay={cfg.cycle_decay} in (0, 1]")
    length = cfg.total_steps // cfg.cycles
    if cfg.cycles > 1 and length <= warmup:
        raise ConfigError(f"optim.cycles={cfg.cycles} leaves {length} steps per cycle, not more than "
                          f"optim.warmup_steps={cfg.warmup_steps}; use fewer cycles or more optim.total_steps")
    if cfg.total_steps <= warmup:
        base = optax.linear_schedule(0.0, cfg.lr, warmup)
    else:
        lengths = [length] * (cfg.cycles - 1) + [cfg.total_steps - length * (cfg.cycles - 1)]
        pieces = [optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, lengths[0], end_value=0.0)]
        # update u (1-based) reads base(u): a cycle's last update reaches 0, the next one starts at its peak
        pieces += [optax.cosine_decay_schedule(cfg.lr * cfg.cycle_decay ** k, n - 1)
                   for k, n in enumerate(lengths[1:], 1)]
        base = optax.join_schedules(pieces, [sum(lengths[:k]) + 1 for k in range(1, cfg.cycles)])
    return lambda count: base(count + 1)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (betas, decoupled weight decay) on the warmup+cosine schedule, each
    parameter's update scaled by its `lr_mults` entry (`scale_by_path`)."""
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.lr}")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    if cfg.lr_mults:
        parts.append(scale_by_path(cfg.lr_mults))
    return optax.chain(*parts)


def param_path(path) -> str:
    """A pytree key path -> the dotted parameter name `lr_mults` patterns match ("connector.net.proj.kernel")."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue   # a Variable's own field (a state of Variables), not part of the parameter's name
        names.append(key_name(k))
    return ".".join(names)


def scale_by_path(mults) -> optax.GradientTransformation:
    """Multiplies each update by the multiplier of the first `(regex, multiplier)` pair whose regex fully matches
    its parameter's dotted path (`param_path`); 1 where none does. A pattern matching no trainable parameter is
    a ConfigError (a misspelt path would otherwise change nothing), raised at `init`."""
    compiled = []
    for i, (pattern, mult) in enumerate(mults):
        try:
            compiled.append((re.compile(pattern), float(mult)))
        except re.error as e:
            raise ConfigError(f"optim.lr_mults[{i}]: {pattern!r} is not a regular expression ({e})") from None
        if not float(mult) >= 0:
            raise ConfigError(f"optim.lr_mults[{i}]: multiplier {mult!r} for {pattern!r} must be >= 0")

    def mult_of(path) -> float:
        name = param_path(path)
        return next((m for rx, m in compiled if rx.fullmatch(name)), 1.0)

    def init(params):
        names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        unused = [rx.pattern for rx, _ in compiled if not any(rx.fullmatch(n) for n in names)]
        if unused:
            raise ConfigError(f"optim.lr_mults: {unused[0]!r} matches no trainable parameter; they are named like "
                              f"{names[0]!r} ({len(names)} in all)")
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(lambda p, u: u * jnp.asarray(mult_of(p), u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def split_microbatches(batch: Batch, n: int) -> Batch:
    """`[B, ...]` -> `[n, B//n, ...]` with strided microbatches (row i goes to microbatch i % n), so each
    microbatch keeps an even share of every data shard."""
    def one(x):
        if x.shape[0] % n:
            raise ConfigError(f"batch size {x.shape[0]} is not divisible by optim.grad_accum={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def build_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, *, grad_accum: int = 1,
                     schedule: optax.Schedule | None = None, donate: bool = True) -> Callable:
    """Returns `step(state: TrainState, frozen, batch, step_index) -> (state, metrics)`, jitted (the state
    donated unless `donate=False`). The model runs in training mode: BatchNorm normalizes with batch statistics
    and `state.model_state` takes the updated running statistics (kept, like everything, on a skipped step).

    Gradients are summed over microbatches and divided by the total loss-token count, so accumulation
    over n microbatches equals one big batch exactly (up to float summation order). A non-finite loss or
    gradient norm skips the update (parameters and optimizer state unchanged) and reports `skipped=1`.
    """

    def grads_of(trainable, frozen, model_state, mb):
        def f(tp):
            # fresh Variables (same arrays) made at this trace level: the forward writes the running state, and a
            # scanned stack writes its dropout streams (keys unchanged) back into the frozen side
            stats_in = [jax.tree.map(jnp.asarray, model_state)] if has_leaves(model_state) else []
            model = nnx.merge(graphdef, tp, jax.tree.map(lambda x: x, frozen), *stats_in)
            loss_sum, n_tok, aux = loss_fn(model, mb)
            stats = nnx.state(model, RUNNING_STATE) if has_leaves(model_state) else model_state
            return loss_sum, (n_tok, aux, stats)
        (loss_sum, (n_tok, aux, stats)), g = jax.value_and_grad(f, has_aux=True)(trainable)
        return loss_sum, n_tok, g, aux, stats

    def step(state: TrainState, frozen, batch, step_index):
        trainable, opt_state, model_state = state.trainable, state.opt_state, state.model_state
        if has_leaves(state.fixed):   # held fixed (model.freeze): in the forward, out of the gradient
            frozen = nnx.merge_state(frozen, state.fixed)
        if grad_accum == 1:
            loss_sum, n_tok, g, aux, new_stats = grads_of(trainable, frozen, model_state, batch)
        else:   # running statistics see the microbatches in order, as separate forwards would
            mbs = split_microbatches(batch, grad_accum)
            zero = jax.tree.map(jnp.zeros_like, trainable)

            def body(carry, mb):
                ls, nt, gs, ms = carry
                l, n, g, _, ms = grads_of(trainable, frozen, ms, mb)
                return (ls + l, nt + n, jax.tree.map(jnp.add, gs, g), ms), None

            (loss_sum, n_tok, g, new_stats), _ = jax.lax.scan(
                body, (jnp.zeros(()), jnp.zeros(()), zero, model_state), mbs)
            aux = {}
        denom = jnp.maximum(n_tok, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        loss = loss_sum / denom
        gnorm = optax.tree.norm(g)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(g, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        metrics = {"loss": loss, "grad_norm": gnorm, "tokens": n_tok, "skipped": 1 - ok.astype(jnp.int32), **aux}
        if schedule is not None:
            metrics["lr"] = schedule(step_index)
        return TrainState(keep(new_trainable, trainable), keep(new_opt, opt_state), keep(new_stats, model_state),
                          state.fixed), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def build_eval_step(graphdef, loss_fn: LossFn) -> Callable:
    """`eval_step(trainable, frozen, batch) -> {'loss_sum', 'tokens'}`, jitted; the model in eval mode
    (running statistics, no dropout)."""
    def ev(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        model.eval()
        loss_sum, n_tok, _ = loss_fn(model, batch)
        return {"loss_sum": loss_sum, "tokens": n_tok}
    return jax.jit(ev)
