"""Format `peft`: the run's LoRA adapters alone, in PEFT's layout, to load over the untouched base LLM.

    files = export(run, out, dtype="float32", max_shard_bytes=...)  # adapter_config.json, adapter_model.safetensors
    # peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)

Per LoRA layer (a scanned stack's stacked factors layer by layer), PEFT's names on the HF module (e.g.
model.layers.3.self_attn.q_proj):
`base_model.model.<module>.lora_A.weight` = A.T `[rank, in]` and `...lora_B.weight` = B.T `[out, rank]`;
PEFT's scaling lora_alpha / r equals ours. PEFT reads one adapter file, so the adapter is never sharded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alm_jax.errors import ConfigError
from alm_jax.export.llm import hf_name, refuse_existing
from alm_jax.export.source import host_array
from alm_jax.export.writer import ShardedSafetensorsWriter
from alm_jax.models.llm import DecoderLM
from alm_jax.models.lora import LayerLoRA, linear_module_paths, lora_layers, lora_per_layer
from alm_jax.weights.alm_params import DTYPES

KEY_PREFIX = "base_model.model."   # PeftModelForCausalLM -> LoraModel -> the HF *ForCausalLM
ONE_FILE = 2 ** 62                 # no size cap: PEFT does not read sharded adapters


def hf_module(path: str, llm: DecoderLM) -> str:
    """Our module path ("layers/0/self_attn/q_proj") -> the HF module name ("model.layers.0.self_attn.q_proj")."""
    key, _ = hf_name(path.replace("/", ".") + ".kernel", llm.cfg)
    return key.removesuffix(".weight")


def adapter_modules(llm: DecoderLM) -> list[tuple[str, LayerLoRA]]:
    """(HF module name, adapter) for every adapted Linear of every layer of `llm` (stacked wrappers layer by
    layer); raises `ConfigError` when there is none or when they differ in rank or alpha (one PEFT config
    holds one of each)."""
    layers = [(hf_module(one.path, llm), one) for one in lora_per_layer(llm)]
    if not layers:
        raise ConfigError("the LLM has no LoRA layers; there is no adapter to export")
    shapes = {(one.wrapper.rank, one.wrapper.alpha) for _, one in layers}
    if len(shapes) > 1:
        raise ConfigError(f"LoRA layers with different (rank, alpha) {sorted(shapes)} cannot share one PEFT config")
    return layers


def target_modules(llm: DecoderLM, modules: list[str]) -> list[str]:
    """PEFT's `target_modules` for LoRA on `modules`: PEFT matches a target by module-name suffix, so the
    short name ("q_proj") when every Linear of that name carries LoRA, else the full module names."""
    every = [hf_module(p, llm) for p in linear_module_paths(llm)]
    targets = set()
    for module in modules:
        short = module.rsplit(".", 1)[-1]
        same_name = [m for m in every if m.rsplit(".", 1)[-1] == short]
        targets.add(short if set(same_name) <= set(modules) else module)
    return sorted(targets)


def adapter_config(llm: DecoderLM, base_dir: str | Path) -> dict:
    """adapter_config.json as `peft.LoraConfig` reads it."""
    layers = adapter_modules(llm)
    layer = layers[0][1].wrapper
    alpha = int(layer.alpha) if float(layer.alpha).is_integer() else float(layer.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_dir).resolve()), "revision": None,
        "r": layer.rank, "lora_alpha": alpha,
        "lora_dropout": float(layer.dropout.rate) if layer.dropout is not None else 0.0,
        "target_modules": target_modules(llm, [m for m, _ in layers]),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_adapter(llm: DecoderLM, base_dir: str | Path, out: str | Path, *, dtype: str) -> list[str]:
    """Writes `llm`'s LoRA factors (cast to `dtype`) and their config into `out`; returns the files written."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    refuse_existing(out, "adapter_model")
    config = adapter_config(llm, base_dir)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=ONE_FILE, prefix="adapter_model")
    for module, one in adapter_modules(llm):
        for name, factor in zip(("lora_A", "lora_B"), one.factors()):
            array = np.asarray(host_array(factor), np.float32).T     # A `[in, r]` -> `[r, in]`; B likewise
            writer.add(f"{KEY_PREFIX}{module}.{name}.weight", np.ascontiguousarray(array, dtype=DTYPES[dtype]))
    files = writer.close()
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["adapter_config.json", *files]


def unsupported(run) -> str | None:
    """Why `run` has no PEFT adapter: it trained no LoRA, or LoRA sits on modules outside the LLM."""
    if run.cfg.model.lora.rank == 0:
        return "the run trained no LoRA (model.lora.rank = 0)"
    outside = [p for p, _ in lora_layers(run.model) if not p.startswith("llm/")]
    if outside:
        return (f"LoRA on modules outside the LLM ({', '.join(outside[:4])}), which a PEFT adapter of the LLM "
                "cannot hold")
    if not lora_layers(run.model.llm):
        return "the run's LLM has no LoRA layers"
    return None


def export(run, out, *, dtype: str, max_shard_bytes: int) -> list[str]:
    """The run's LLM LoRA adapters as a PEFT adapter directory `out` (`max_shard_bytes` unused: one file)."""
    return write_adapter(run.model.llm, run.cfg.model.llm, out, dtype=dtype)
