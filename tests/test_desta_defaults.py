"""DeSTA2.5 Q-Former defaults: `num_heads` 0 -> the audio encoder's attention heads, `intermediate` 0 -> 3072
(`modeling_desta25.py`'s BertConfig), resolved against the encoders when the ALM is assembled; explicit values
win; other kinds keep theirs (MATS: 8 heads)."""

import dataclasses

import pytest
from flax import nnx

from alm_jax.config import ConnectorConfig, EncoderConfig, ModelConfig
from alm_jax.errors import ConfigError
from alm_jax.models.connectors import DestaConnector, EncoderInfo, MatsConnector
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.weights.alm_params import _assemble, resolve_connector

ENC_HEADS = 3   # not 8 (the old default) and not hidden / 64: the encoder's own count must be what is used
ECFG = EncoderConfig(kind="whisper", taps=(0, 1), tap_indexing="blocks", pad_to_seconds=None)


def tiny_whisper() -> WhisperEncoder:
    cfg = WhisperEncoderConfig(num_mel_bins=80, d_model=24, encoder_layers=2, encoder_attention_heads=ENC_HEADS,
                               encoder_ffn_dim=48, max_source_positions=50)
    return WhisperEncoder(cfg, rngs=nnx.Rngs(1))


def tiny_llm() -> DecoderLM:
    cfg = LLMConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False})
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def model_cfg(**connector) -> ModelConfig:
    return ModelConfig(encoders=(ECFG,), connector=ConnectorConfig(kind="desta", num_queries=2, num_layers=1,
                                                                   **connector))


def test_config_defaults_mean_the_kind_default():
    cc = ConnectorConfig(kind="desta")
    assert (cc.num_heads, cc.intermediate) == (0, 0)
    assert DestaConnector.resolve_config(cc, [20]) == dataclasses.replace(cc, num_heads=20, intermediate=3072)
    assert DestaConnector.resolve_config(dataclasses.replace(cc, num_heads=6, intermediate=1024), [20]) == \
        dataclasses.replace(cc, num_heads=6, intermediate=1024)
    mats = ConnectorConfig(kind="mats")
    assert MatsConnector.resolve_config(mats, [0]) is mats   # no encoder-dependent default
    with pytest.raises(ConfigError, match="num_heads"):
        DestaConnector.resolve_config(cc, [0])               # e.g. a CLAP encoder 0: no single head count


def test_assembled_desta_uses_encoder_heads_and_3072():
    cfg = model_cfg()
    assert resolve_connector(cfg, [tiny_whisper()]).num_heads == ENC_HEADS
    model = _assemble(cfg, tiny_llm(), [tiny_whisper()], nnx.Rngs(2))
    net = model.connector.net
    assert (net.cfg.heads, net.cfg.intermediate, net.cfg.hidden) == (ENC_HEADS, 3072, 24)
    layer = net.qformer.layer
    assert layer.self_attn.heads == layer.cross_attn.heads == ENC_HEADS
    assert layer.intermediate.kernel.shape[-2:] == (24, 3072)


def test_explicit_heads_and_intermediate_win():
    model = _assemble(model_cfg(num_heads=4, intermediate=40), tiny_llm(), [tiny_whisper()], nnx.Rngs(2))
    net = model.connector.net
    assert (net.cfg.heads, net.cfg.intermediate) == (4, 40)
    assert net.qformer.layer.self_attn.heads == 4
    assert net.qformer.layer.intermediate.kernel.shape[-2:] == (24, 40)


def test_unresolved_heads_fail_clearly():
    from alm_jax.models.alm import AudioLanguageModel
    with pytest.raises(ConfigError, match="resolve_config"):
        AudioLanguageModel([tiny_whisper()], tiny_llm(), ConnectorConfig(kind="desta", num_queries=2, num_layers=1),
                           [ECFG], rngs=nnx.Rngs(0))


def test_mats_keeps_its_eight_heads():
    enc = EncoderInfo(dim=16, taps=(0,), n_entries=1, frames="clap")
    default = MatsConnector(ConnectorConfig(kind="mats", mapper_tokens=2, num_layers=1, hidden=16), [enc], 32,
                            rngs=nnx.Rngs(0))
    explicit = MatsConnector(ConnectorConfig(kind="mats", mapper_tokens=2, num_layers=1, hidden=16, num_heads=4),
                             [enc], 32, rngs=nnx.Rngs(0))
    assert (default.mapper.cfg.heads, explicit.mapper.cfg.heads) == (8, 4)
