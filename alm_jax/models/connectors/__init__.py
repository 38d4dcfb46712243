"""Trainable connectors between frozen audio encoders and the LLM.

- `qformer`: DeSTA2.5 multi-tap Q-Former (`QFormerConnector`, `load_bert_qformer_weights`).
- `alarm_adapter`: ALARM per-encoder adapters (`AlarmAdapter`, `MLPAdapter`, `IdentityAdapter`).
- `fusion`: ALARM fusion (`CrossAttentionFusion`, `PerceiverFusion`, `SumFusion`) and `AudioBoundary`.
- `mats`: MATS `ClipCapMapper`, `noise_injection`, `kmeans`, `SantaMemory`.
- `common`: attention, conv, BatchNorm and layer-average building blocks.
"""

from alm_jax.models.connectors.alarm_adapter import (
    AlarmAdapter, AlarmAdapterConfig, IdentityAdapter, IdentityAdapterConfig, MLPAdapter, MLPAdapterConfig)
from alm_jax.models.connectors.common import BatchNorm1d, LayerSoftmaxAverage, MultiHeadAttention
from alm_jax.models.layers import Conv1d
from alm_jax.models.connectors.fusion import (
    AudioBoundary, CrossAttentionFusion, CrossAttentionFusionConfig, Perceiver, PerceiverConfig,
    PerceiverFusion, PerceiverFusionConfig, PreNormDecoderLayer, SumFusion)
from alm_jax.models.connectors.mats import (
    DEFAULT_NOISE_STD, ClipCapMapper, ClipCapMapperConfig, SantaBank, SantaConfig, SantaMemory, kmeans,
    l2_normalize, noise_injection)
from alm_jax.models.connectors.qformer import (
    BertQFormerLayer, QFormerConfig, QFormerConnector, QFormerStack, load_bert_qformer_weights)

__all__ = [
    "AlarmAdapter", "AlarmAdapterConfig", "IdentityAdapter", "IdentityAdapterConfig", "MLPAdapter",
    "MLPAdapterConfig", "BatchNorm1d", "Conv1d", "LayerSoftmaxAverage", "MultiHeadAttention", "AudioBoundary",
    "CrossAttentionFusion", "CrossAttentionFusionConfig", "Perceiver", "PerceiverConfig", "PerceiverFusion",
    "PerceiverFusionConfig", "PreNormDecoderLayer", "SumFusion", "DEFAULT_NOISE_STD", "ClipCapMapper",
    "ClipCapMapperConfig", "SantaBank", "SantaConfig", "SantaMemory", "kmeans", "l2_normalize",
    "noise_injection", "BertQFormerLayer", "QFormerConfig", "QFormerConnector", "QFormerStack",
    "load_bert_qformer_weights",
]
