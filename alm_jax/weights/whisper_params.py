"""Strict key table: HF Whisper encoder tensors -> `alm_jax.models.whisper.WhisperEncoder` state.

Accepts both checkpoint layouts: `encoder.*` (WhisperModel) and `model.encoder.*`
(WhisperForConditionalGeneration). Decoder tensors (and `proj_out`) are known and skipped via
`ENCODER_IGNORE`; anything else unmapped is an error.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.weights.hf_import import Rule, identity, import_weights, read_config, transpose

_P = r"(?:model\.)?encoder\."  # the one encoder prefix, with or without the `model.` wrapper
_L = _P + r"layers\.(\d+)\."


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv1d weight `[out, in, width]` -> our kernel `[width, in, out]`."""
    return np.transpose(x, (2, 1, 0))


ENCODER_RULES: tuple[Rule, ...] = (
    Rule(_P + r"conv1\.weight", "conv1.kernel", conv_kernel),
    Rule(_P + r"conv1\.bias", "conv1.bias"),
    Rule(_P + r"conv2\.weight", "conv2.kernel", conv_kernel),
    Rule(_P + r"conv2\.bias", "conv2.bias"),
    Rule(_P + r"embed_positions\.weight", "embed_positions", identity),
    Rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", "layers.{0}.attn.{1}.kernel", transpose),
    Rule(_L + r"self_attn\.(q_proj|v_proj|out_proj)\.bias", "layers.{0}.attn.{1}.bias"),
    Rule(_L + r"self_attn_layer_norm\.weight", "layers.{0}.attn_norm.scale"),
    Rule(_L + r"self_attn_layer_norm\.bias", "layers.{0}.attn_norm.bias"),
    Rule(_L + r"(fc1|fc2)\.weight", "layers.{0}.{1}.kernel", transpose),
    Rule(_L + r"(fc1|fc2)\.bias", "layers.{0}.{1}.bias"),
    Rule(_L + r"final_layer_norm\.weight", "layers.{0}.mlp_norm.scale"),
    Rule(_L + r"final_layer_norm\.bias", "layers.{0}.mlp_norm.bias"),
    Rule(_P + r"layer_norm\.weight", "layer_norm.scale"),
    Rule(_P + r"layer_norm\.bias", "layer_norm.bias"),
)

# Known tensors of full Whisper checkpoints that an encoder-only load skips.
ENCODER_IGNORE: tuple[str, ...] = (
    r"(?:model\.)?decoder\..*",
    r"proj_out\.weight",
)


def load_whisper_encoder(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> WhisperEncoder:
    """The encoder of a local HF Whisper directory (WhisperModel or WhisperForConditionalGeneration,
    safetensors), parameters stored in `dtype` (frozen), placed on `mesh` by their logical axes if given.
    Decoder weights are skipped; any other unexpected, missing or mis-shaped key raises WeightImportError."""
    cfg = WhisperEncoderConfig.from_hf(read_config(path))
    return import_weights(lambda: WhisperEncoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                          path, ENCODER_RULES, dtype=dtype, mesh=mesh, ignore=ENCODER_IGNORE,
                          family="whisper encoder")
