"""Describe an HF checkpoint directory from its headers alone (no tensor is read)."""

from __future__ import annotations

import collections
from pathlib import Path

from alm_jax.errors import WeightImportError
from alm_jax.weights.hf_import import open_safetensors, read_config, safetensors_files

FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "whisper": "whisper", "mistral": "llama"}


def describe_checkpoint(model_dir: str | Path) -> dict:
    """{'family', 'model_type', 'num_params', 'dtypes': {dtype: n}, 'details': {...}} of `model_dir`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightImportError(f"{model_dir} is not a directory; pass a Hugging Face model directory")
    cfg = read_config(model_dir)
    model_type = cfg.get("model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise WeightImportError(f"{model_dir}: model_type {model_type!r} is not supported; "
                                f"supported: {sorted(set(FAMILIES))}")
    dtypes: dict[str, int] = collections.Counter()
    for f in safetensors_files(model_dir):
        with open_safetensors(f) as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                dtypes[sl.get_dtype()] += n
    details = {}
    if family == "whisper":
        details = {"layers": f"encoder {cfg.get('encoder_layers')}, decoder {cfg.get('decoder_layers')}",
                   "width": cfg.get("d_model"), "mel bins": cfg.get("num_mel_bins")}
    else:
        details = {"layers": cfg.get("num_hidden_layers"), "width": cfg.get("hidden_size"),
                   "heads": f"{cfg.get('num_attention_heads')} (kv {cfg.get('num_key_value_heads')})",
                   "vocab": cfg.get("vocab_size"), "tied head": cfg.get("tie_word_embeddings", False)}
    return {"dir": str(model_dir), "family": family, "model_type": model_type,
            "num_params": sum(dtypes.values()), "dtypes": dict(dtypes), "details": details}
