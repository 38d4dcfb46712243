"""Trainable connectors between frozen audio encoders and the LLM, and the registry of connector kinds.

Every kind has the shape of `base.Connector` (encoder states + valid samples in, `[clips, tokens,
llm_dim]` out; its token rule; which encoders and taps it reads). Adding a kind = one module with a
`Connector` subclass + one line in `CONNECTORS`. Nothing outside this registry switches on the kind.

- `base`: `Connector`, `TokenRule` (valid samples -> audio tokens), `EncoderInfo`.
- `alarm`: the ALARM kinds (`alarm`, `sum`, `alarm_ca`, `alarm_p`).
- `qformer`: DeSTA2.5 multi-tap Q-Former (`QFormerConnector`, `load_bert_qformer_weights`).
- `alarm_adapter`: ALARM per-encoder adapters (`AlarmAdapter`, `MLPAdapter`, `IdentityAdapter`).
- `fusion`: ALARM fusion (`CrossAttentionFusion`, `PerceiverFusion`, `SumFusion`) and `AudioBoundary`.
- `mats`: MATS `ClipCapMapper`, `noise_injection` / `CaptionNoise`, `kmeans`, `SantaMemory`.
- `common`: attention, conv, BatchNorm and layer-average building blocks.
"""

from alm_jax.errors import ConfigError
from alm_jax.models.connectors.alarm import AlarmCAConnector, AlarmConnector, AlarmPConnector, SumConnector
from alm_jax.models.connectors.alarm_adapter import (
    AlarmAdapter, AlarmAdapterConfig, IdentityAdapter, IdentityAdapterConfig, MaskedBatchNorm1d, MLPAdapter,
    MLPAdapterConfig, freeze_statistics)
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule, token_rule_for
from alm_jax.models.connectors.common import BatchNorm1d, LayerSoftmaxAverage, MultiHeadAttention
from alm_jax.models.layers import Conv1d
from alm_jax.models.connectors.fusion import (
    AudioBoundary, CrossAttentionFusion, CrossAttentionFusionConfig, Perceiver, PerceiverConfig,
    PerceiverFusion, PerceiverFusionConfig, PreNormDecoderLayer, SumFusion)
from alm_jax.models.connectors.mats import (
    DEFAULT_NOISE_STD, CaptionNoise, ClipCapMapper, ClipCapMapperConfig, MatsConnector, SantaBank, SantaConfig,
    SantaMemory, SantaMix, kmeans, l2_normalize, noise_injection)
from alm_jax.models.connectors.qwen2_audio import Qwen2AudioConnector
from alm_jax.models.connectors.qformer import (
    BertQFormerLayer, DestaConnector, QFormerConfig, QFormerConnector, QFormerStack, load_bert_qformer_weights)

CONNECTORS: dict[str, type[Connector]] = {
    "desta": DestaConnector,
    "alarm": AlarmConnector,
    "alarm_ca": AlarmCAConnector,
    "alarm_p": AlarmPConnector,
    "sum": SumConnector,
    "mats": MatsConnector,
    "qwen2_audio": Qwen2AudioConnector,
}


def connector_token_rule(cc, encoders) -> TokenRule:
    """Audio tokens of a clip for connector config `cc` and encoder configs `encoders` (see `token_rule_for`)."""
    return token_rule_for(connector_class(cc.kind), cc, encoders)


def connector_class(kind: str) -> type[Connector]:
    """The registered class of connector `kind` (`model.connector.kind`)."""
    if kind not in CONNECTORS:
        raise ConfigError(f"model.connector.kind={kind!r} is not a connector kind; choose one of {sorted(CONNECTORS)}")
    return CONNECTORS[kind]


__all__ = [
    "CONNECTORS", "connector_class", "connector_token_rule", "token_rule_for", "Connector", "EncoderInfo",
    "TokenRule", "DestaConnector", "AlarmConnector",
    "AlarmCAConnector", "AlarmPConnector", "SumConnector", "MatsConnector",
    "AlarmAdapter", "AlarmAdapterConfig", "IdentityAdapter", "IdentityAdapterConfig", "MLPAdapter",
    "MLPAdapterConfig", "MaskedBatchNorm1d", "freeze_statistics", "BatchNorm1d", "Conv1d", "LayerSoftmaxAverage", "MultiHeadAttention", "AudioBoundary",
    "CrossAttentionFusion", "CrossAttentionFusionConfig", "Perceiver", "PerceiverConfig", "PerceiverFusion",
    "PerceiverFusionConfig", "PreNormDecoderLayer", "SumFusion", "DEFAULT_NOISE_STD", "CaptionNoise", "ClipCapMapper",
    "ClipCapMapperConfig", "SantaBank", "SantaConfig", "SantaMemory", "SantaMix", "kmeans", "l2_normalize",
    "noise_injection", "BertQFormerLayer", "QFormerConfig", "QFormerConnector", "QFormerStack",
    "load_bert_qformer_weights",
]
