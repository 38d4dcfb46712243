"""`load_encoder(dir)`: any supported frozen audio encoder, chosen by its config.json `model_type`.

    whisper        -> alm_jax.models.whisper.WhisperEncoder   (weights.whisper_params.load_whisper_encoder)
    wav2vec2-bert  -> alm_jax.models.w2v_bert.W2VBertModel     (weights.w2v_bert_params.load_w2v_bert)
    clap           -> alm_jax.models.clap.ClapModel            (weights.clap_params.load_clap; inside an ALM
                      the kind `clap` loads only its audio side: `load_clap_audio`)

`ENCODER_KINDS` maps the same families to the `EncoderConfig.kind` names used in run configs.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from alm_jax.errors import WeightImportError
from alm_jax.weights.clap_params import load_clap
from alm_jax.weights.hf_import import read_config
from alm_jax.weights.w2v_bert_params import load_w2v_bert
from alm_jax.weights.whisper_params import load_whisper_encoder

LOADERS = {"whisper": load_whisper_encoder, "wav2vec2-bert": load_w2v_bert,   # config.json model_type -> loader
           "clap": load_clap}
ENCODER_KINDS = {"whisper": "whisper", "wav2vec2-bert": "w2v_bert", "clap": "clap"}          # model_type -> EncoderConfig.kind


def encoder_model_type(path: str | Path) -> str:
    """The `model_type` of the HF directory `path`, checked to be a supported encoder family."""
    model_type = read_config(path).get("model_type")
    if model_type not in LOADERS:
        raise WeightImportError(f"{path}: config.json model_type={model_type!r} is not a supported audio encoder; "
                                f"supported: {sorted(LOADERS)}")
    return model_type


def load_encoder(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> nnx.Module:
    """The frozen encoder in the local HF directory `path` (parameters in `dtype`, on `mesh` if given): a
    WhisperEncoder for Whisper checkpoints (the decoder is skipped), a W2VBertModel for W2V-BERT ones."""
    return LOADERS[encoder_model_type(path)](path, dtype=dtype, mesh=mesh)
