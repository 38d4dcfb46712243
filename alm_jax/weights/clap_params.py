"""Strict key table: HF `ClapModel` tensors -> `alm_jax.models.clap.ClapModel` state.

Buffers that HF saves but recomputes (`position_ids`, `token_type_ids`, `relative_position_index`,
`num_batches_tracked`) are known and skipped (`CLAP_IGNORE`); anything else unmapped is an error. torch Conv2d
weights `[out, in, kh, kw]` become `[kh, kw, in, out]`; the AFF block's 1x1 convs become Linear kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from alm_jax.audio.clap_features import ClapFeatureSettings
from alm_jax.errors import WeightImportError
from alm_jax.models.clap import ClapAudioTower, ClapConfig, ClapModel
from alm_jax.weights.hf_import import Rule, import_weights, read_config, transpose

_T = r"text_model\."
_TL = _T + r"encoder\.layer\.(\d+)\."
_A = r"audio_model\.audio_encoder\."
_B = _A + r"layers\.(\d+)\.blocks\.(\d+)\."
_AFF = _A + r"patch_embed\.fusion_model\."


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight `[out, in, kh, kw]` -> `[kh, kw, in, out]`."""
    return np.transpose(x, (2, 3, 1, 0))


def pointwise_kernel(x: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d weight `[out, in, 1, 1]` -> Linear kernel `[in, out]`."""
    return x[:, :, 0, 0].T


def _aff_rules() -> tuple[Rule, ...]:
    """The AFF block's nn.Sequential entries: local_att (0 conv, 1 BN, 3 conv, 4 BN) and global_att (0 pool,
    1 conv, 2 BN, 4 conv, 5 BN) -> `{branch}_conv{1,2}` / `{branch}_bn{1,2}`."""
    dst = "audio_model.patch_embed.fusion_model."
    rules = []
    for branch, (c1, b1, c2, b2) in (("local", (0, 1, 3, 4)), ("global", (1, 2, 4, 5))):
        for n, (c, b) in enumerate(((c1, b1), (c2, b2)), start=1):
            src = _AFF + rf"{branch}_att\."
            rules += [Rule(src + rf"{c}\.weight", f"{dst}{branch}_conv{n}.kernel", pointwise_kernel),
                      Rule(src + rf"{c}\.bias", f"{dst}{branch}_conv{n}.bias"),
                      Rule(src + rf"{b}\.weight", f"{dst}{branch}_bn{n}.scale"),
                      Rule(src + rf"{b}\.bias", f"{dst}{branch}_bn{n}.bias"),
                      Rule(src + rf"{b}\.running_mean", f"{dst}{branch}_bn{n}.mean"),
                      Rule(src + rf"{b}\.running_var", f"{dst}{branch}_bn{n}.var")]
    return tuple(rules)


CLAP_RULES: tuple[Rule, ...] = (
    Rule(r"logit_scale_(a|t)", "logit_scale_{0}"),
    # text tower
    Rule(_T + r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
         "text_model.{0}.embedding"),
    Rule(_T + r"embeddings\.LayerNorm\.weight", "text_model.embeddings_norm.scale"),
    Rule(_T + r"embeddings\.LayerNorm\.bias", "text_model.embeddings_norm.bias"),
    Rule(_TL + r"attention\.self\.(query|key|value)\.weight", "text_model.layers.{0}.{1}.kernel", transpose),
    Rule(_TL + r"attention\.self\.(query|key|value)\.bias", "text_model.layers.{0}.{1}.bias"),
    Rule(_TL + r"attention\.output\.dense\.weight", "text_model.layers.{0}.attention_dense.kernel", transpose),
    Rule(_TL + r"attention\.output\.dense\.bias", "text_model.layers.{0}.attention_dense.bias"),
    Rule(_TL + r"attention\.output\.LayerNorm\.weight", "text_model.layers.{0}.attention_norm.scale"),
    Rule(_TL + r"attention\.output\.LayerNorm\.bias", "text_model.layers.{0}.attention_norm.bias"),
    Rule(_TL + r"(intermediate|output)\.dense\.weight", "text_model.layers.{0}.{1}.kernel", transpose),
    Rule(_TL + r"(intermediate|output)\.dense\.bias", "text_model.layers.{0}.{1}.bias"),
    Rule(_TL + r"output\.LayerNorm\.weight", "text_model.layers.{0}.output_norm.scale"),
    Rule(_TL + r"output\.LayerNorm\.bias", "text_model.layers.{0}.output_norm.bias"),
    Rule(_T + r"pooler\.dense\.weight", "text_model.pooler.kernel", transpose),
    Rule(_T + r"pooler\.dense\.bias", "text_model.pooler.bias"),
    # projections
    Rule(r"(text_projection|audio_projection)\.(linear1|linear2)\.weight", "{0}.{1}.kernel", transpose),
    Rule(r"(text_projection|audio_projection)\.(linear1|linear2)\.bias", "{0}.{1}.bias"),
    # audio tower
    Rule(_A + r"batch_norm\.weight", "audio_model.batch_norm.scale"),
    Rule(_A + r"batch_norm\.bias", "audio_model.batch_norm.bias"),
    Rule(_A + r"batch_norm\.running_mean", "audio_model.batch_norm.mean"),
    Rule(_A + r"batch_norm\.running_var", "audio_model.batch_norm.var"),
    Rule(_A + r"patch_embed\.(proj|mel_conv2d)\.weight", "audio_model.patch_embed.{0}.kernel", conv_kernel),
    Rule(_A + r"patch_embed\.(proj|mel_conv2d)\.bias", "audio_model.patch_embed.{0}.bias"),
    Rule(_A + r"patch_embed\.norm\.weight", "audio_model.patch_embed.norm.scale"),
    Rule(_A + r"patch_embed\.norm\.bias", "audio_model.patch_embed.norm.bias"),
    Rule(_B + r"(layernorm_before|layernorm_after)\.weight", "audio_model.layers.{0}.blocks.{1}.{2}.scale"),
    Rule(_B + r"(layernorm_before|layernorm_after)\.bias", "audio_model.layers.{0}.blocks.{1}.{2}.bias"),
    Rule(_B + r"attention\.self\.relative_position_bias_table",
         "audio_model.layers.{0}.blocks.{1}.attention.relative_position_bias_table"),
    Rule(_B + r"attention\.self\.(query|key|value)\.weight", "audio_model.layers.{0}.blocks.{1}.attention.{2}.kernel",
         transpose),
    Rule(_B + r"attention\.self\.(query|key|value)\.bias", "audio_model.layers.{0}.blocks.{1}.attention.{2}.bias"),
    Rule(_B + r"attention\.output\.dense\.weight", "audio_model.layers.{0}.blocks.{1}.attention.dense.kernel",
         transpose),
    Rule(_B + r"attention\.output\.dense\.bias", "audio_model.layers.{0}.blocks.{1}.attention.dense.bias"),
    Rule(_B + r"(intermediate|output)\.dense\.weight", "audio_model.layers.{0}.blocks.{1}.{2}.kernel", transpose),
    Rule(_B + r"(intermediate|output)\.dense\.bias", "audio_model.layers.{0}.blocks.{1}.{2}.bias"),
    Rule(_A + r"layers\.(\d+)\.downsample\.reduction\.weight", "audio_model.layers.{0}.downsample.reduction.kernel",
         transpose),
    Rule(_A + r"layers\.(\d+)\.downsample\.norm\.weight", "audio_model.layers.{0}.downsample.norm.scale"),
    Rule(_A + r"layers\.(\d+)\.downsample\.norm\.bias", "audio_model.layers.{0}.downsample.norm.bias"),
    Rule(_A + r"norm\.weight", "audio_model.norm.scale"),
    Rule(_A + r"norm\.bias", "audio_model.norm.bias"),
) + _aff_rules()

CLAP_IGNORE: tuple[str, ...] = (
    _T + r"embeddings\.(position_ids|token_type_ids)",
    _B + r"attention\.self\.relative_position_index",
    r".*\.num_batches_tracked",
)


def load_clap(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> ClapModel:
    """The CLAP model (both towers, projections, logit scales) of a local HF directory (safetensors),
    parameters stored in `dtype` (frozen), placed on `mesh` by their logical axes if given. Unexpected, missing
    or mis-shaped keys raise WeightImportError naming the key."""
    cfg = ClapConfig.from_hf(read_config(path))
    return import_weights(lambda: ClapModel(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                          path, CLAP_RULES, dtype=dtype, mesh=mesh, ignore=CLAP_IGNORE, family="clap")


def load_clap_audio(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> ClapAudioTower:
    """CLAP's audio tower + audio projection as a frozen ALM encoder (`EncoderConfig.kind: clap`), with the
    feature settings of the directory's `preprocessor_config.json` (HF's defaults, at the tower's mel bins,
    when there is none). The text tower comes along (MATS embeds its training captions with it)."""
    model = load_clap(path, dtype=dtype, mesh=mesh)
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        try:
            settings = ClapFeatureSettings.from_hf(json.loads(pre.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise WeightImportError(f"{pre}: not a readable ClapFeatureExtractor config ({e})") from None
    else:
        audio = model.config.audio
        settings = ClapFeatureSettings(feature_size=audio.num_mel_bins,
                                       truncation="fusion" if audio.enable_fusion else "rand_trunc")
    return ClapAudioTower(model, settings)
