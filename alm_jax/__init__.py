"""alm_jax: audio-language models trained the self-generated-alignment way, in JAX/Flax NNX.

Public API: `alm_jax.load_llm`, `alm_jax.load_whisper_encoder`, `alm_jax.load_encoder` (any supported
encoder by config.json model_type), `alm_jax.audio.log_mel`, and the `alm` command. They are imported on first use, so `import alm_jax` (and the CLI's start) stays light.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["load_llm", "load_whisper_encoder", "load_encoder", "audio"]

_LAZY = {"load_llm": ("alm_jax.weights.llm_params", "load_llm"),
         "load_whisper_encoder": ("alm_jax.weights.whisper_params", "load_whisper_encoder"),
         "load_encoder": ("alm_jax.weights.encoders", "load_encoder"),
         "audio": ("alm_jax.audio", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'alm_jax' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value
    return value
