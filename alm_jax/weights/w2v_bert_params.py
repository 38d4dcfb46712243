"""Strict key table: HF `Wav2Vec2BertModel` tensors -> `alm_jax.models.w2v_bert.W2VBertModel` state.

Accepts the bare model (`feature_projection.*`, `encoder.layers.*`) and task checkpoints that wrap it in
`wav2vec2_bert.*`. `masked_spec_embed` (SpecAugment, training only) is known and skipped, as are the heads of
task checkpoints (`lm_head`, `projector`, `classifier`, ...: `W2V_BERT_IGNORE`); anything else unmapped is an
error.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from alm_jax.models.w2v_bert import W2VBertConfig, W2VBertModel
from alm_jax.weights.hf_import import Rule, import_weights, read_config, transpose

_P = r"(?:wav2vec2_bert\.)?"
_L = _P + r"encoder\.layers\.(\d+)\."


def pointwise_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv1d(kernel_size=1) weight `[out, in, 1]` -> our Linear kernel `[in, out]`."""
    return x[:, :, 0].T


def depthwise_kernel(x: np.ndarray) -> np.ndarray:
    """torch depthwise Conv1d weight `[channels, 1, width]` -> our `[width, 1, channels]`."""
    return np.transpose(x, (2, 1, 0))


_LN = r"(ffn1_layer_norm|self_attn_layer_norm|ffn2_layer_norm|final_layer_norm)"
W2V_BERT_RULES: tuple[Rule, ...] = (
    Rule(_P + r"feature_projection\.layer_norm\.weight", "feature_projection.layer_norm.scale"),
    Rule(_P + r"feature_projection\.layer_norm\.bias", "feature_projection.layer_norm.bias"),
    Rule(_P + r"feature_projection\.projection\.weight", "feature_projection.projection.kernel", transpose),
    Rule(_P + r"feature_projection\.projection\.bias", "feature_projection.projection.bias"),
    Rule(_L + _LN + r"\.weight", "layers.{0}.{1}.scale"),
    Rule(_L + _LN + r"\.bias", "layers.{0}.{1}.bias"),
    Rule(_L + r"(ffn1|ffn2)\.(intermediate_dense|output_dense)\.weight", "layers.{0}.{1}.{2}.kernel", transpose),
    Rule(_L + r"(ffn1|ffn2)\.(intermediate_dense|output_dense)\.bias", "layers.{0}.{1}.{2}.bias"),
    Rule(_L + r"self_attn\.(linear_q|linear_k|linear_v|linear_out)\.weight", "layers.{0}.self_attn.{1}.kernel",
         transpose),
    Rule(_L + r"self_attn\.(linear_q|linear_k|linear_v|linear_out)\.bias", "layers.{0}.self_attn.{1}.bias"),
    Rule(_L + r"self_attn\.distance_embedding\.weight", "layers.{0}.self_attn.distance_embedding"),
    Rule(_L + r"self_attn\.linear_pos\.weight", "layers.{0}.self_attn.linear_pos.kernel", transpose),
    Rule(_L + r"self_attn\.(pos_bias_u|pos_bias_v)", "layers.{0}.self_attn.{1}"),
    Rule(_L + r"conv_module\.(layer_norm|depthwise_layer_norm)\.weight", "layers.{0}.conv_module.{1}.scale"),
    Rule(_L + r"conv_module\.(layer_norm|depthwise_layer_norm)\.bias", "layers.{0}.conv_module.{1}.bias"),
    Rule(_L + r"conv_module\.(pointwise_conv1|pointwise_conv2)\.weight", "layers.{0}.conv_module.{1}.kernel",
         pointwise_kernel),
    Rule(_L + r"conv_module\.depthwise_conv\.weight", "layers.{0}.conv_module.depthwise_conv", depthwise_kernel),
)

W2V_BERT_IGNORE: tuple[str, ...] = (
    _P + r"masked_spec_embed",
    r"(lm_head|projector|classifier|feature_extractor|tdnn|objective)\..*",
)


def load_w2v_bert(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> W2VBertModel:
    """The W2V-BERT encoder of a local HF directory (safetensors), parameters stored in `dtype` (frozen),
    placed on `mesh` by their logical axes if given. Unexpected, missing or mis-shaped keys raise
    WeightImportError naming the key."""
    cfg = W2VBertConfig.from_hf(read_config(path))
    return import_weights(lambda: W2VBertModel(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                          path, W2V_BERT_RULES, dtype=dtype, mesh=mesh, ignore=W2V_BERT_IGNORE,
                          family="w2v-bert")
