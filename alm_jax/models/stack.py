"""Layer stacks: L copies of one block, unrolled or scanned (the `model.scan_layers` switch).

    self.layers = make_stack(lambda rngs: Block(cfg, rngs=rngs), cfg.num_layers, scan=True, rngs=rngs)
    carry, ys = run_stack(self.layers, body, carry, xs, remat="save_dots")   # body(block, carry, x) -> (carry, y)

Unrolled (`scan=False`): an `nnx.List` of L blocks; layer i's variables sit at `<stack>.i.<name>` and
`run_stack` is a Python loop, so the traced program holds L copies of the block.
Scanned (`scan=True`): ONE block whose every variable is stacked `[L, ...]` with the leading logical axis
"layers" (`LAYER_AXIS`), at `<stack>.<name>` (no index); `run_stack` is one `jax.lax.scan`, so the block is
traced and compiled once whatever L is. Both run the same block code on the same numbers, and a seed
initializes both alike.

`stacks(module)` finds the scanned stacks of a model; `layer_paths` / `unstack` give the per-layer names
(`layers.3.self_attn.q_proj.kernel`: HF key tables, exports, LoRA regexes) of stacked ones.

Remat (`REMAT_POLICIES`), per block, for the backward pass: "none"; "full" = `jax.checkpoint` of the block
(only its inputs are kept, everything is recomputed); "save_dots" = keep the outputs of matmuls without batch
dimensions (the projections and MLP; MaxText's "minimal"), recompute the rest (norms, attention scores).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError

LAYER_AXIS = "layers"
_SIZE_ATTR = "scanned_layers"     # set on a scanned stack's block: its L
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Body = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)} (model.remat)")
    return remat


def make_stack(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, scan: bool,
               rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` blocks from `make_block(rngs)`: an `nnx.List` (unrolled), or one block whose variables are
    stacked `[num_layers, ...]` with leading logical axis "layers" (scanned). Either way the blocks are drawn
    one after the other from `rngs`, so both forms start from the same weights (and the same dropout
    streams) for the same seed. Under `nnx.eval_shape` (weight import) nothing is allocated."""
    if num_layers < 1:
        raise ConfigError(f"a layer stack needs at least one layer, got {num_layers}")
    blocks = [make_block(rngs) for _ in range(num_layers)]
    if not scan:
        return nnx.List(blocks)
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(b) for b in blocks))
    for _, var in nnx.to_flat_state(stacked):
        axes = var.get_metadata().get("out_sharding")
        if axes:
            var.set_metadata(out_sharding=(LAYER_AXIS, *axes))
    block = nnx.merge(graphdef, stacked)
    setattr(block, _SIZE_ATTR, num_layers)
    return block


def scanned_size(node: Any) -> int | None:
    """L of a scanned stack (the stacked block), None for anything else."""
    return getattr(node, _SIZE_ATTR, None) if isinstance(node, nnx.Module) else None


def stack_length(stack: nnx.Module) -> int:
    """The number of layers of a stack (scanned or unrolled)."""
    size = scanned_size(stack)
    return len(stack) if size is None else size


def run_stack(stack: nnx.Module, body: Body, carry: Any, xs: Any = None, *, remat: str = "none",
              length: int | None = None) -> tuple[Any, Any]:
    """Runs the first `length` layers (None = all) of `stack` in order: `carry, y = body(block, carry, x)`
    per layer, x the layer's slice of `xs` (a pytree with leading axis `length`, or None). Returns the last
    carry and the ys stacked `[length, ...]` (None when body returns None). Scanned: one `lax.scan`;
    unrolled: a loop. Rng state a block advances (dropout) is written back to the stack."""
    policy = REMAT_POLICIES[check_remat(remat)]
    n = stack_length(stack) if length is None else length
    if scanned_size(stack) is not None:
        graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
        if n != scanned_size(stack):
            params, rest = jax.tree.map(lambda a: a[:n], (params, rest))
        step = _layer_step(graphdef, body)
        if policy is not None:
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)   # scan already keeps the layers apart
        carry, (ys, rng_state) = jax.lax.scan(lambda c, inp: step(c, *inp), carry, (params, rest, xs), length=n)
        if jax.tree.leaves(rng_state):
            if n != scanned_size(stack):
                raise ConfigError("a scanned stack with rng state (dropout) must run all its layers")
            nnx.update(stack, rng_state)
        return carry, ys
    ys = []
    for i in range(n):
        block = stack[i]
        graphdef, params, rest = nnx.split(block, nnx.Param, ...)
        step = _layer_step(graphdef, body)
        if policy is not None:
            step = jax.checkpoint(step, policy=policy)
        carry, (y, rng_state) = step(carry, params, rest, None if xs is None else jax.tree.map(lambda a: a[i], xs))
        nnx.update(block, rng_state)
        ys.append(y)
    return carry, (jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None)


def _layer_step(graphdef, body: Body):
    """(carry, params, rest, x) -> (carry, (y, the block's rng state after the call)), a pure function."""
    def step(carry, params, rest, x):
        block = nnx.merge(graphdef, params, rest)
        carry, y = body(block, carry, x)
        return carry, (y, nnx.state(block, nnx.RngState))
    return step


# ------------------------------------------------------------------------------------------- names

Path = tuple  # a state path: attribute names (str) and list indices (int)


def stacks(module: nnx.Module) -> dict[Path, int]:
    """The scanned stacks inside `module`: their path -> L."""
    return {tuple(path): size for path, node in nnx.iter_graph(module) if (size := scanned_size(node)) is not None}


def stack_of(path: Path, found: dict[Path, int]) -> Path | None:
    """The scanned stack that holds the variable or module at `path`, or None."""
    for prefix in found:
        if path[:len(prefix)] == prefix:
            return prefix
    return None


def layer_paths(path: Path, found: dict[Path, int]) -> list[Path]:
    """The per-layer paths of a variable or module at `path`: `[path]` outside a scanned stack, else one per
    layer: `layers.self_attn.q_proj` -> `layers.0.self_attn.q_proj`, `layers.1.self_attn.q_proj`, ..."""
    prefix = stack_of(path, found)
    if prefix is None:
        return [path]
    return [prefix + (i,) + path[len(prefix):] for i in range(found[prefix])]


def unstack(path: Path, value: Any, found: dict[Path, int]) -> Iterator[tuple[Path, Any]]:
    """(path, value) of a variable, or, inside a scanned stack, (per-layer path, value[i]) for each layer i:
    `layers.self_attn.q_proj.kernel [L, ...]` -> `layers.i.self_attn.q_proj.kernel [...]`."""
    if stack_of(path, found) is None:
        yield path, value
        return
    for i, one in enumerate(layer_paths(path, found)):
        yield one, value[i]
