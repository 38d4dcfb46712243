"""Builds an `AudioLanguageModel` from a `ModelConfig`: the one place an ALM is assembled.

    model = build_alm(cfg.model, mesh=mesh, seed=cfg.seed)

Frozen encoders and the LLM are imported strictly from local HF directories in the compute dtype (and
placed on `mesh` by their logical axes); LoRA adapters are added when `lora.rank > 0`; the connector is
the registered kind's class, fresh, in float32. `demo:` names must have been resolved already
(`weights.demo_models.resolve_demo_paths`, done by every `alm` command).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from alm_jax.config import ModelConfig
from alm_jax.errors import ConfigError
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.w2v_bert import W2VBertConfig, W2VBertModel
from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.models.connectors import connector_class
from alm_jax.models.lora import apply_lora
from alm_jax.weights.architectures import architecture_config
from alm_jax.weights.clap_params import load_clap_audio
from alm_jax.weights.demo_models import DEMO_PREFIX
from alm_jax.weights.llm_params import load_llm
from alm_jax.weights.w2v_bert_params import load_w2v_bert
from alm_jax.weights.whisper_params import load_whisper_encoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ENCODER_LOADERS = {"whisper": load_whisper_encoder,   # EncoderConfig.kind -> loader(dir, dtype=, mesh=)
                   "w2v_bert": load_w2v_bert, "clap": load_clap_audio}
SCANNED_ENCODERS = ("whisper",)   # kinds whose loader takes scan_layers= (W2V-BERT, CLAP stay unrolled)


def model_dir(path: str, key: str) -> str:
    """`path` if it is a local directory, else a `ConfigError` naming the config key and what to give."""
    if path.startswith(DEMO_PREFIX):
        raise ConfigError(f"{key}={path!r} is a demo model name that was not resolved; run through the `alm` "
                          "command, or call alm_jax.weights.demo_models.resolve_demo_paths(cfg) first")
    if not Path(path).is_dir():
        raise ConfigError(f"{key}={path!r} is not a directory; give a local Hugging Face model directory "
                          "(or demo:smollm2-135m-instruct / demo:whisper-tiny.en)")
    return path


def build_alm(cfg: ModelConfig, *, mesh=None, seed: int = 0) -> AudioLanguageModel:
    """Frozen encoders + LLM (compute dtype), LoRA if configured, and a fresh float32 connector. Layer stacks
    (LLM, Whisper encoder, Q-Former) are scanned or unrolled as `cfg.scan_layers` says; `cfg.remat` applies
    to the stacks the backward pass goes through (LLM, connector; the encoders are frozen behind
    stop_gradient)."""
    connector_class(cfg.connector.kind)   # an unknown kind fails before any weight is read
    dtype = DTYPES[cfg.dtype]
    llm = load_llm(model_dir(cfg.llm, "model.llm"), dtype=dtype, mesh=mesh, scan_layers=cfg.scan_layers,
                   remat=cfg.remat)
    encoders = []
    for i, e in enumerate(cfg.encoders):
        if e.kind not in ENCODER_LOADERS:
            raise ConfigError(f"model.encoders.{i}.kind={e.kind!r}; choose one of {sorted(ENCODER_LOADERS)}")
        scan_kw = dict(scan_layers=cfg.scan_layers) if e.kind in SCANNED_ENCODERS else {}
        encoders.append(ENCODER_LOADERS[e.kind](model_dir(e.path, f"model.encoders.{i}.path"), dtype=dtype, mesh=mesh,
                                                **scan_kw))
    return _assemble(cfg, llm, encoders, nnx.Rngs(seed))


# EncoderConfig.kind -> encoder module -> its attention heads (0: no single count, CLAP's Swin stages differ)
ENCODER_HEADS = {"whisper": lambda e: e.config.encoder_attention_heads,
                 "w2v_bert": lambda e: e.config.num_attention_heads,
                 "clap": lambda e: 0}


def resolve_connector(cfg: ModelConfig, encoders: list):
    """`cfg.connector` with its kind's encoder-dependent defaults filled in (`Connector.resolve_config`; e.g.
    DeSTA's `num_heads` 0 -> encoder 0's attention heads, `intermediate` 0 -> 3072)."""
    heads = [ENCODER_HEADS[e.kind](m) if e.kind in ENCODER_HEADS else 0 for e, m in zip(cfg.encoders, encoders)]
    return connector_class(cfg.connector.kind).resolve_config(cfg.connector, heads)


def _assemble(cfg: ModelConfig, llm: DecoderLM, encoders: list, rngs: nnx.Rngs) -> AudioLanguageModel:
    """LoRA on `llm` if configured, and the fresh float32 connector between `encoders` and it (its config's
    defaults resolved against the encoders: `resolve_connector`)."""
    if cfg.lora.rank > 0:
        apply_lora(llm, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   target_regex=cfg.lora.target, rngs=rngs)
    return AudioLanguageModel(encoders, llm, resolve_connector(cfg, encoders), cfg.encoders, dtype=DTYPES[cfg.dtype],
                              param_dtype=jnp.float32, rngs=rngs, scan_layers=cfg.scan_layers, remat=cfg.remat)


# EncoderConfig.kind -> (config.json dict, dtype, rngs, scan_layers) -> a randomly initialised encoder of that
# architecture
ENCODER_BUILDERS = {
    "whisper": lambda c, dtype, rngs, scan: WhisperEncoder(WhisperEncoderConfig.from_hf(c), dtype=dtype,
                                                           param_dtype=dtype, rngs=rngs, scan_layers=scan),
    "w2v_bert": lambda c, dtype, rngs, scan: W2VBertModel(W2VBertConfig.from_hf(c), dtype=dtype, param_dtype=dtype,
                                                          rngs=rngs),
}


def abstract_alm(cfg: ModelConfig, *, seed: int = 0) -> AudioLanguageModel:
    """The model `build_alm(cfg)` would build, as shapes only (`nnx.eval_shape`: every array a
    `jax.ShapeDtypeStruct`, logical-axis metadata kept): nothing is allocated and no weight file is read.
    Architectures come from each directory's config.json, or the published table
    (`weights/architectures.py`) when the directory is not here."""
    connector_class(cfg.connector.kind)
    dtype = DTYPES[cfg.dtype]
    llm_json = architecture_config(cfg.llm, "model.llm")
    encoder_jsons = []
    for i, e in enumerate(cfg.encoders):
        if e.kind not in ENCODER_BUILDERS:
            raise ConfigError(f"model.encoders.{i}.kind={e.kind!r} cannot be built from its architecture alone yet "
                              f"(shape-only builds support {sorted(ENCODER_BUILDERS)})")
        encoder_jsons.append(architecture_config(e.path, f"model.encoders.{i}.path"))

    def build() -> AudioLanguageModel:
        rngs = nnx.Rngs(seed)
        llm = DecoderLM(LLMConfig.from_hf(llm_json), dtype=dtype, param_dtype=dtype, rngs=rngs,
                        scan_layers=cfg.scan_layers, remat=cfg.remat)
        encoders = [ENCODER_BUILDERS[e.kind](j, dtype, rngs, cfg.scan_layers)
                    for e, j in zip(cfg.encoders, encoder_jsons)]
        return _assemble(cfg, llm, encoders, rngs)

    return nnx.eval_shape(build)
