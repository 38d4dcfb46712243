"""Format `llm`: the run's backbone LLM, LoRA folded in, as a standard Hugging Face directory.

    files = export(run, out, dtype="bfloat16", max_shard_bytes=5 * 10**9)
    # out/config.json, model.safetensors (or shards + model.safetensors.index.json), tokenizer files

`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load the result. Each
LoRA layer's kernel is written as base + A @ B * (alpha / rank), computed in float32 for that one tensor and
then cast to the export dtype; the run's model is never modified. `write_llm` is the core, on any
`DecoderLM` with the HF directory it was imported from (config.json and tokenizer files come from there).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from flax import nnx

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.export.source import host_array
from alm_jax.export.writer import ShardedSafetensorsWriter
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.lora import LoRALinear
from alm_jax.models.stack import stacks, unstack
from alm_jax.weights.alm_params import DTYPES
from alm_jax.weights.hf_import import identity, read_config, transpose
from alm_jax.weights.llm_params import rules_for

# The tokenizer / chat template / generation files of an HF directory, copied when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "generation_config.json")

_LAYER = r"layers\.(\d+)\."
# Our state path (full match) -> HF key template ({i} = group i) and the transform from ours to HF's layout:
# our kernels `[in, out]` become torch Linear weights `[out, in]`. The inverse of llm_params.rules_for.
OURS_TO_HF: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"embed_tokens\.embedding", "model.embed_tokens.weight", identity),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.scale", "model.layers.{0}.{1}.weight", identity),
    (_LAYER + r"self_attn\.(q|k|v|o)_proj\.kernel", "model.layers.{0}.self_attn.{1}_proj.weight", transpose),
    (_LAYER + r"self_attn\.(q|k|v|o)_proj\.bias", "model.layers.{0}.self_attn.{1}_proj.bias", identity),
    (_LAYER + r"self_attn\.(q|k)_norm\.scale", "model.layers.{0}.self_attn.{1}_norm.weight", identity),
    (_LAYER + r"mlp\.(gate|up|down)_proj\.kernel", "model.layers.{0}.mlp.{1}_proj.weight", transpose),
    (_LAYER + r"mlp\.(gate|up|down)_proj\.bias", "model.layers.{0}.mlp.{1}_proj.bias", identity),
    (r"norm\.scale", "model.norm.weight", identity),
    (r"lm_head\.kernel", "lm_head.weight", transpose),
)


def hf_name(path: str, cfg: LLMConfig) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Our dotted state path (e.g. "layers.0.self_attn.q_proj.kernel") -> (HF key, transform ours -> HF).
    Checked against the import table of `cfg`: importing that key must fill exactly this path."""
    for pattern, template, transform in OURS_TO_HF:
        m = re.fullmatch(pattern, path)
        if m is None:
            continue
        key = template.format(*m.groups())
        back = [r.target.format(*g) for r in _rules(cfg) if (g := r.match(key)) is not None]
        if back != [path]:
            raise WeightImportError(f"{path} -> {key}: the import table of this {cfg.model_type} config maps "
                                    f"{key} to {back or 'nothing'}; the export table is out of step with it")
        return key, transform
    raise WeightImportError(f"the LLM parameter {path!r} has no Hugging Face name; extend export.llm.OURS_TO_HF")


@functools.lru_cache(maxsize=8)
def _rules(cfg: LLMConfig) -> tuple:
    return tuple(rules_for(cfg))


def merged_tensors(llm: DecoderLM) -> Iterator[tuple[str, np.ndarray]]:
    """(our per-layer dotted path, float32 numpy) for every parameter of `llm`, one layer's tensor at a time,
    LoRA folded in: a wrapped layer's `X.base.kernel` comes out as `X.kernel` = base + A @ B * scale
    `[in, out]` (unless already merged), its `X.base.bias` as `X.bias`; the LoRA factors themselves are not
    yielded. A scanned stack's `[L, ...]` parameters come out per layer (`layers.3.self_attn.q_proj.kernel`),
    the names of an unrolled model."""
    found = stacks(llm)
    wrappers: dict[tuple, LoRALinear] = {path: node for path, node in nnx.iter_graph(llm)
                                         if isinstance(node, LoRALinear)}
    for path, var in nnx.to_flat_state(nnx.state(llm, nnx.Param)):
        path = tuple(path)
        if path[:-1] in wrappers and path[-1] in ("lora_a", "lora_b"):
            continue
        layer = wrappers.get(path[:-2])
        folded = layer is not None and path[-2] == "base"
        name = path[:-2] + path[-1:] if folded else path
        value = var[...] if hasattr(var, "__getitem__") else var.value
        slices = unstack(name, value, found)
        for index, (one_path, one) in enumerate(slices):
            array = host_array(one).astype(np.float32, copy=False)
            if folded and path[-1] == "kernel" and not layer.merged:
                delta = layer.delta(index if layer.stacked else None)
                array = array + host_array(delta).astype(np.float32, copy=False)
            yield ".".join(str(p) for p in one_path), array


def hf_config(base_dir: str | Path, cfg: LLMConfig, dtype: str) -> dict:
    """The base directory's config.json with the export dtype; refuses one that no longer describes `cfg`."""
    config = read_config(base_dir)
    if LLMConfig.from_hf(config) != cfg:
        raise ConfigError(f"{base_dir}/config.json no longer describes the run's LLM ({cfg.model_type}, "
                          f"{cfg.num_layers} layers, hidden {cfg.hidden_size}); restore the base model directory")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return config


def copy_side_files(base_dir: str | Path, out: Path) -> list[str]:
    """Copies the tokenizer, chat template and generation config files that `base_dir` has into `out`."""
    copied = []
    for name in SIDE_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    return copied


def refuse_existing(out: Path, prefix: str) -> None:
    """A `ConfigError` when `out` already holds `<prefix>*.safetensors` weights or their index: a stale shard
    or index left beside new files would be read in their place."""
    old = sorted(p.name for p in out.glob(f"{prefix}*.safetensors*"))
    if old:
        raise ConfigError(f"{out} already holds exported weights ({', '.join(old[:3])}); give a new or empty "
                          "--out directory")


def write_llm(llm: DecoderLM, base_dir: str | Path, out: str | Path, *, dtype: str,
              max_shard_bytes: int) -> list[str]:
    """Writes `llm` (LoRA merged, weights cast to `dtype`) with `base_dir`'s config and tokenizer as an HF
    directory `out`; returns the files written, relative to `out`."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    refuse_existing(out, "model")
    config = hf_config(base_dir, llm.cfg, dtype)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes)
    for path, array in merged_tensors(llm):
        key, transform = hf_name(path, llm.cfg)
        writer.add(key, np.ascontiguousarray(transform(array), dtype=DTYPES[dtype]))
    files = writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["config.json", *files, *copy_side_files(base_dir, out)]


def unsupported(run) -> str | None:
    """Every run has an LLM."""
    return None


def export(run, out, *, dtype: str, max_shard_bytes: int) -> list[str]:
    """The run's LLM (LoRA merged) as an HF causal-LM directory `out`."""
    return write_llm(run.model.llm, run.cfg.model.llm, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
