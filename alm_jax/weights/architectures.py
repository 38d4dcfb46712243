"""The architecture (config.json) of a model directory named in a run config, for shape-only work.

    config = architecture_config("/models/Llama-3.1-8B-Instruct", "model.llm")

Ahead-of-time compilation (`alm compile`) and FLOP counts need shapes, not weights, and are run where the
multi-gigabyte checkpoints are not (a laptop, a CPU CI box). So: a local directory's `config.json` when it
exists, else the published architecture of a checkpoint this codebase's configs name, looked up by the
directory's last path component (`PUBLISHED`). These are the architecture fields of the public
`config.json` files (no weights, no tokenizer); anything else is an error naming what to give.
"""

from __future__ import annotations

from pathlib import Path

from alm_jax.errors import ConfigError
from alm_jax.weights.demo_models import DEMO_PREFIX
from alm_jax.weights.hf_import import read_config

_LLAMA31_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
_QWEN3_4B_2507 = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "max_position_embeddings": 262144, "rope_theta": 5000000.0,
}
_WHISPER_LARGE_V3 = {
    "model_type": "whisper", "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32,
    "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "max_source_positions": 1500,
    "decoder_layers": 32, "decoder_attention_heads": 20, "decoder_ffn_dim": 5120, "vocab_size": 51866,
    "max_target_positions": 448, "activation_function": "gelu",
}
_W2V_BERT_2 = {
    "model_type": "wav2vec2-bert", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "feature_projection_input_dim": 160, "hidden_act": "swish",
    "layer_norm_eps": 1e-5, "position_embeddings_type": "relative_key", "max_source_positions": 5000,
    "left_max_position_embeddings": 64, "right_max_position_embeddings": 8, "conv_depthwise_kernel_size": 31,
}

PUBLISHED: dict[str, dict] = {
    "Llama-3.1-8B-Instruct": _LLAMA31_8B, "Llama-3.1-8B": _LLAMA31_8B,
    "Qwen3-4B-Thinking-2507": _QWEN3_4B_2507, "Qwen3-4B-Instruct-2507": _QWEN3_4B_2507,
    "whisper-large-v3": _WHISPER_LARGE_V3,
    "w2v-bert-2.0": _W2V_BERT_2,
}
"""Directory name (the HF repo name) -> the architecture fields of its published config.json."""


def architecture_config(path: str, key: str) -> dict:
    """`path`'s config.json when `path` is a local directory, else `PUBLISHED[basename]`; a `ConfigError`
    naming `key` otherwise. `demo:` names must have been resolved already."""
    if path.startswith(DEMO_PREFIX):
        raise ConfigError(f"{key}={path!r} is a demo model name that was not resolved; run through the `alm` "
                          "command, or call alm_jax.weights.demo_models.resolve_demo_paths(cfg) first")
    if Path(path).is_dir():
        return read_config(path)
    name = Path(path.rstrip("/")).name
    if name in PUBLISHED:
        return dict(PUBLISHED[name])
    raise ConfigError(f"{key}={path!r} is not a local directory and {name!r} is not a published architecture "
                      f"this codebase knows ({', '.join(sorted(PUBLISHED))}); point {key} at a directory holding "
                      "the model's config.json (weights are not read)")
