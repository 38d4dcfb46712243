"""Strict import of Hugging Face safetensors checkpoints into NNX models, tensor by tensor.

A model family supplies a key table: a list of `Rule`s, each a regex over HF tensor names, the NNX state
path it fills (with `{0}`, `{1}`... taken from the regex groups), and a transform (transpose, reshape).
Import is strict: a tensor that no rule maps (unexpected), that two rules map, that maps to a path the
model does not have, that fills a path twice, or whose transformed shape differs from the model's, raises
`WeightImportError` naming the key; so does a model parameter that no tensor filled (missing).

Tensors are read one at a time with `safetensors.safe_open` and placed straight onto their target
sharding, so a 7B model never exists twice in host RAM. Scanned layer stacks (`models/stack.py`) keep the
per-layer key tables: a rule target `layers.3.mlp.up_proj.kernel` fills slice 3 of the stacked parameter
`layers.mlp.up_proj.kernel` `[L, ...]`, written into its device buffer in place; each slice is its own
target (filled exactly once, reported by its per-layer name when missing or doubled).

A truncated or corrupt safetensors file (bad header, data not covering what the header declares) raises
`WeightImportError` naming the file and saying to download or convert it again (`open_safetensors`); a
damaged byte inside a tensor's data cannot be detected: the format carries no checksum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open

from alm_jax.errors import WeightImportError
from alm_jax.models.stack import layer_paths, stack_of, stacks
from alm_jax.sharding import state_shardings

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight `[out, in]` -> our kernel `[in, out]`."""
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps HF keys matching `pattern` (full match) to the NNX path `target` (dot-separated; `{i}` is
    regex group i), applying `transform` to the tensor."""
    pattern: str
    target: str
    transform: Transform = identity

    def match(self, key: str) -> tuple[str, ...] | None:
        m = re.fullmatch(self.pattern, key)
        return None if m is None else m.groups()


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: `model.safetensors`, or those of a sharded index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightImportError(f"{index}: not a valid safetensors index ({e})") from e
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise WeightImportError(
            f"{model_dir} holds only pickle weights (*.bin/*.pt), which alm_jax never loads; convert them to "
            "safetensors first (e.g. transformers `save_pretrained(..., safe_serialization=True)`).")
    raise WeightImportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")


def _damaged(path: Path, err: BaseException) -> WeightImportError:
    return WeightImportError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is "
                             "truncated or corrupt (an interrupted download or conversion?): download it again, or "
                             "convert it again (demo models: `alm models prepare-demo --force`)")


class _CheckedFile:
    """A `safe_open` handle whose reads raise `WeightImportError` naming the file."""

    def __init__(self, handle: Any, path: Path):
        self._handle, self.path = handle, path

    def _call(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(self.path, e) from None

    def keys(self) -> list[str]:
        return self._call(self._handle.keys)

    def get_slice(self, key: str) -> Any:
        return self._call(self._handle.get_slice, key)

    def get_tensor(self, key: str) -> np.ndarray:
        return self._call(self._handle.get_tensor, key)

    def metadata(self) -> Any:
        return self._call(self._handle.metadata)


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[_CheckedFile]:
    """`safe_open(path, framework="numpy")`, with a missing, truncated or corrupt file raising
    `WeightImportError` that names it and says to download / convert it again."""
    path = Path(path)
    if not path.is_file():
        raise WeightImportError(f"missing checkpoint file {path}; download the model again (or check the "
                                "directory: an index lists this shard)")
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, e) from None
    with handle as h:
        yield _CheckedFile(h, path)


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """Yields (key, load, shape) for every tensor; `load()` reads just that tensor as numpy."""
    for f in safetensors_files(model_dir):
        if not f.exists():
            raise WeightImportError(f"missing checkpoint shard {f}")
        with open_safetensors(f) as sf:
            for key in sf.keys():
                shape = tuple(sf.get_slice(key).get_shape())
                yield key, (lambda sf=sf, key=key: sf.get_tensor(key)), shape


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def _slots(abs_state: nnx.State, found: dict) -> dict[str, tuple[tuple, int | None]]:
    """Every fillable target by its per-layer dotted name -> (state path, layer index or None): a scanned
    stack's `[L, ...]` parameter is L targets, `layers.0.<name>` ... `layers.{L-1}.<name>`."""
    out = {}
    for path, _ in nnx.to_flat_state(abs_state):
        path = tuple(path)
        stacked = stack_of(path, found) is not None
        for i, one in enumerate(layer_paths(path, found)):
            out[_path_str(one)] = (path, i if stacked else None)
    return out


def _set_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding) -> Callable:
    """jit of `_set_layer` that updates the stacked buffer in place (donated), keeping its sharding."""
    return jax.jit(_set_layer, donate_argnums=0, out_shardings=sharding)


def _write_layer(stacked: jax.Array | None, host: np.ndarray, index: int, shape: tuple, sharding) -> jax.Array:
    """Slice `index` of a stacked `[L, ...]` device array (allocated with `sharding` on first use) set to `host`."""
    if stacked is None:
        stacked = jnp.zeros(shape, host.dtype, device=sharding)
    layer_sharding = None if sharding is None else NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    layer = jax.device_put(host, layer_sharding) if layer_sharding is not None else jnp.asarray(host)
    return _layer_writer(sharding)(stacked, layer, np.int32(index))


def import_weights(model_factory: Callable[[], nnx.Module], model_dir: str | Path, rules: Sequence[Rule], *,
                   dtype=jnp.float32, mesh: Mesh | None = None, ignore: Sequence[str] = (),
                   family: str = "model") -> nnx.Module:
    """Builds the model abstractly, fills every parameter from `model_dir` through `rules`, returns it.

    `model_factory()` must build the model with parameters in `dtype`. `ignore` lists regexes of HF keys
    that are known and deliberately not loaded (e.g. a duplicated tied head). With `mesh`, every tensor is
    placed with the sharding its logical axes map to; otherwise on the default device. Rule targets name
    layers one by one (`layers.3....`) whether the model's stacks are scanned or unrolled.
    """
    abstract = nnx.eval_shape(model_factory)
    found = stacks(abstract)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh) if mesh is not None else None
    targets = {tuple(p): v for p, v in nnx.to_flat_state(abs_state)}
    target_sharding = ({tuple(p): v.get_value() for p, v in nnx.to_flat_state(shardings)}
                       if shardings is not None else {})
    slots = _slots(abs_state, found)
    filled: dict[str, str] = {}                   # per-layer target name -> the key that filled it
    values: dict[tuple, jax.Array] = {}           # state path -> its array (stacked ones filled slice by slice)
    ignore_re = [re.compile(p) for p in ignore]

    for key, load, shape in iter_tensors(model_dir):
        hits = [(r, g) for r in rules if (g := r.match(key)) is not None]
        if not hits:
            if any(p.fullmatch(key) for p in ignore_re):
                continue
            raise WeightImportError(f"{family}: unexpected key {key!r} (shape {shape}) in {model_dir}: no rule maps it; "
                                    "is this checkpoint of a different architecture or config?")
        if len(hits) > 1:
            raise WeightImportError(f"{family}: key {key!r} matches {len(hits)} rules "
                                    f"({[h[0].pattern for h in hits]}); the key table is ambiguous")
        rule, groups = hits[0]
        path = rule.target.format(*groups)
        if path not in slots:
            raise WeightImportError(f"{family}: key {key!r} maps to {path!r}, which the model does not have "
                                    "(config and checkpoint disagree, e.g. number of layers)")
        if path in filled:
            raise WeightImportError(f"{family}: key {key!r} fills {path!r}, already filled by {filled[path]!r}")
        state_path, layer = slots[path]
        var = targets[state_path]
        full_shape = tuple(var.get_value().shape)
        want = full_shape if layer is None else full_shape[1:]
        host = rule.transform(load())
        if tuple(host.shape) != want:
            raise WeightImportError(f"{family}: key {key!r} has shape {shape} -> {tuple(host.shape)} after transform, "
                                    f"but the model expects {want} at {path!r}")
        host = np.asarray(host, dtype=var.get_value().dtype)
        sharding = target_sharding.get(state_path)
        if layer is not None:
            values[state_path] = _write_layer(values.get(state_path), host, layer, full_shape, sharding)
        elif sharding is not None:
            values[state_path] = jax.device_put(host, sharding)
        else:
            values[state_path] = jnp.asarray(host)
        filled[path] = key
        del host

    missing = [p for p in slots if p not in filled]
    if missing:
        raise WeightImportError(f"{family}: {len(missing)} model parameter(s) not found in {model_dir}: "
                                f"{sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}; the checkpoint is "
                                "incomplete or of a different config")
    state = nnx.from_flat_state([(p, targets[p].replace(values[p])) for p in targets])
    return nnx.merge(graphdef, state)


def read_config(model_dir: str | Path) -> dict:
    """config.json of an HF directory as a dict, with a clear error when absent or malformed."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise WeightImportError(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightImportError(f"{path}: invalid JSON ({e})") from e
