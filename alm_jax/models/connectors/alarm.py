"""The ALARM family of connector kinds: per-encoder adapters, optional fusion of several encoders, and learned
start/end boundary tokens around each clip (Blinorot/ALARM `llm_audio_wrapper.py`, `audio_adapter.py`,
`audio_fusion.py`, `fusion_implementations/`).

    alarm     encoder 0 -> its adapter -> boundary                                   max(T0, 1) + 2 tokens
    sum       every encoder -> its adapter -> element-wise sum -> boundary           max(T0, .., Tk, 1) + 2
    alarm_ca  encoder 0 adapted = queries; every other adapted encoder refines it by
              cross-attention (CrossAttentionFusion) -> boundary                     max(T0, .., Tk, 1) + 2
    alarm_p   other encoders (layer-averaged states) -> one Perceiver each (L latents)
              prefixed to the adapted encoder 0 -> boundary                          T0 + L*(E-1) + 2 + 2

Ti = stream i's adapted length for the clip: its encoder's valid frames (`alm_jax.audio.features.encoder_frames`
with that encoder's rule and input convention; ALARM's configs: `alarm`) // 2 for a conv adapter ("batch" /
"layer"), unchanged for "mlp" / "identity" (ALARM's `calc_length`); the fused length is the maximum over the streams
(`AudioFusion.calc_length`), at least 1 (`get_audio_embeddings`). Each stream's adapter is
`model.connector.adapters[i]` (published: Whisper batch, W2V-BERT / SSLAM layer, MuQ mlp; ALARM-P's conditional
encoders identity). Adapters see ALARM's trimmed batch (`alarm_adapter` module docstring); streams are zero-padded
to one length (`pad_outputs`). Outputs `[N, M, llm_dim]`; rows past a clip's count are zero padding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig
from alm_jax.errors import ConfigError
from alm_jax.models.connectors.alarm_adapter import (
    AlarmAdapter, AlarmAdapterConfig, IdentityAdapter, IdentityAdapterConfig, MLPAdapter, MLPAdapterConfig)
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule, maximum
from alm_jax.models.connectors.fusion import (
    AudioBoundary, CrossAttentionFusion, CrossAttentionFusionConfig, PerceiverConfig, PerceiverFusion,
    PerceiverFusionConfig, SumFusion)

ADAPTER_DOWNSAMPLE = {"batch": 2, "layer": 2, "mlp": 1, "identity": 1}   # adapter kind -> frames per token


def stream_adapters(cc: ConnectorConfig, n_encoders: int, conditional: str | None = None) -> tuple[str, ...]:
    """Adapter kind per encoder: `cc.adapters` (one per encoder), else `cc.norm` conv adapters (encoders 1.. get
    `conditional` when given: ALARM-P's identity)."""
    if cc.adapters:
        if len(cc.adapters) != n_encoders:
            raise ConfigError(f"model.connector.adapters={list(cc.adapters)} names {len(cc.adapters)} adapters for "
                              f"{n_encoders} encoders; give one per entry of model.encoders (batch, layer, mlp or "
                              "identity), or leave it empty")
        bad = [a for a in cc.adapters if a not in ADAPTER_DOWNSAMPLE]
        if bad:
            raise ConfigError(f"model.connector.adapters: {bad} are not adapter kinds; use {list(ADAPTER_DOWNSAMPLE)}")
        return tuple(cc.adapters)
    return (cc.norm,) + ((conditional or cc.norm),) * (n_encoders - 1)


def _pad_time(x: jax.Array, t: int) -> jax.Array:
    return x if x.shape[1] == t else jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))


class _AlarmFamily(Connector):
    """Shared construction: `self.adapters` (one per stream read), `self.fusion` (or none), `self.boundary`;
    `adapt` runs the adapters on ALARM's trimmed batch."""

    conditional_adapter: str | None = None   # default adapter of encoders 1.. (None: cc.norm)
    counted_streams: str = "all"              # "all": the fused length is the max over streams; "main": stream 0

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        kinds = stream_adapters(cc, n_encoders, cls.conditional_adapter)
        n = n_encoders if cls.counted_streams == "all" else 1
        down = tuple(ADAPTER_DOWNSAMPLE[k] for k in kinds[:n])
        return TokenRule(extra=2, downsample=down, prefix=cls.fusion_prefix(cc, n_encoders))

    @classmethod
    def fusion_prefix(cls, cc: ConnectorConfig, n_encoders: int) -> int:
        return 0

    def _adapter(self, kind: str, cc: ConnectorConfig, enc: EncoderInfo, llm_dim: int, kw, project: bool = True):
        h = cc.adapter_dim
        if kind in ("batch", "layer"):
            return AlarmAdapter(AlarmAdapterConfig(layers=enc.taps, enc_dim=enc.dim, hidden=h, conv_dim=2 * h,
                                                   llm_dim=llm_dim, norm=kind), **kw)
        if kind == "mlp":
            return MLPAdapter(MLPAdapterConfig(layers=enc.taps, enc_dim=enc.dim, hidden=h, llm_dim=llm_dim), **kw)
        return IdentityAdapter(IdentityAdapterConfig(layers=enc.taps, enc_dim=enc.dim,
                                                     llm_dim=llm_dim if project else None), **kw)

    def _finish(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], n_read: int, llm_dim: int, kw,
                raw_conditional: bool = False, fusion=None) -> None:
        """Adapters, then `fusion()` (a factory, or None), then the boundary (this order draws the parameters)."""
        kinds = stream_adapters(cc, len(encoders), self.conditional_adapter)[:n_read]
        self.adapter_kinds = kinds
        self.adapters = nnx.List([self._adapter(k, cc, e, llm_dim, kw, project=not (raw_conditional and i > 0))
                                  for i, (k, e) in enumerate(zip(kinds, encoders))])
        if fusion is not None:
            self.fusion = fusion()
        self.boundary = AudioBoundary(llm_dim, **kw)
        self.encoder_taps = tuple(e.taps for e in encoders[:n_read])
        self.frame_rules = tuple((e.frames, e.convention) for e in encoders[:n_read])   # (kind, convention)

    def adapted(self, audio_samples: jax.Array, i: int = 0) -> jax.Array:
        """Stream i's adapted length per clip `[N]`: its encoder's frames // 2 (conv) or frames (ALARM's
        `calc_length`)."""
        return encoder_frames(audio_samples, *self.frame_rules[i]) // ADAPTER_DOWNSAMPLE[self.adapter_kinds[i]]

    def adapt(self, states, audio_samples: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """Every stream through its adapter on ALARM's trimmed batch -> (outputs `[N, T_i, dim_i]`, zero past the
        batch's longest clip; adapted lengths `[N]`). Empty clip slots (0 samples) stay out of the statistics."""
        clips = audio_samples > 0
        outs, lengths = [], []
        for i, (adapter, s) in enumerate(zip(self.adapters, states)):
            frames = encoder_frames(audio_samples, *self.frame_rules[i])
            outs.append(adapter(s, frames, clips))
            lengths.append(self.adapted(audio_samples, i))
        return outs, lengths

    @staticmethod
    def fused_lengths(lengths: Sequence[jax.Array]) -> jax.Array:
        """Tokens per clip before the boundary: the max over the streams' lengths, at least 1."""
        out = lengths[0]
        for n in lengths[1:]:
            out = maximum(out, n)
        return maximum(out, 1)


class AlarmConnector(_AlarmFamily):
    """Registry kind `alarm`: one encoder, its adapter, boundary tokens (ALARM's single-encoder models)."""
    kind = "alarm"
    counted_streams = "main"

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._finish(cc, encoders, 1, llm_dim, kw)

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        outs, lengths = self.adapt(states[:1], audio_samples)
        return self.boundary(outs[0], self.fused_lengths(lengths))


class SumConnector(_AlarmFamily):
    """Registry kind `sum`: every encoder adapted to the LLM width, zero-padded to one length and summed
    element-wise (ALARM's `fusion_type: sum`), boundary tokens."""
    kind = "sum"
    min_encoders = 2

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._finish(cc, encoders, len(encoders), llm_dim, kw, fusion=lambda: SumFusion(pad_to_longest=True))

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        outs, lengths = self.adapt(states, audio_samples)
        return self.boundary(self.fusion(outs), self.fused_lengths(lengths))


class AlarmCAConnector(_AlarmFamily):
    """Registry kind `alarm_ca`: adapted encoder 0 (queries) refined by cross-attention to every other adapted
    encoder in turn (`fusion_layers[i]` decoder layers each, `fusion_heads` heads). Streams are zero-padded to
    the longest; the main stream's lengths mask its own keys and every conditional stream's keys, as ALARM's
    `CrossAttentionFusion` does; the clip keeps max(stream lengths) tokens."""
    kind = "alarm_ca"
    min_encoders = 2

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n_cond = len(encoders) - 1
        layers = cc.fusion_layers or (1,) * n_cond
        if len(layers) != n_cond or min(layers) < 1:
            raise ConfigError(f"model.connector.fusion_layers={list(cc.fusion_layers)}: give one count >= 1 per "
                              f"conditional encoder ({n_cond}: model.encoders 1..), or leave it empty (1 each)")
        d = cc.hidden or cc.adapter_dim
        self._finish(cc, encoders, len(encoders), llm_dim, kw, fusion=lambda: CrossAttentionFusion(
            CrossAttentionFusionConfig(llm_dim=llm_dim, d=d, heads=cc.fusion_heads, ffn=cc.intermediate or 4 * d,
                                       dropout=cc.dropout, layers_per_stream=tuple(layers)), **kw))

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        outs, lengths = self.adapt(states, audio_samples)
        t = max(o.shape[1] for o in outs)
        main, *conds = [_pad_time(o, t) for o in outs]
        mask = jnp.arange(t)[None] < lengths[0][:, None]
        fused = self.fusion(main, conds, mask, [mask] * len(conds))
        return self.boundary(fused, self.fused_lengths(lengths))


class AlarmPConnector(_AlarmFamily):
    """Registry kind `alarm_p`: each other encoder's layer-averaged states (identity adapter, no projection) ->
    its own Perceiver (masked by that encoder's frames) -> `[cond_start, latents..., cond_end]` prefixed to
    adapted encoder 0 -> boundary tokens (ALARM's `MultiPerceiverFusion`)."""
    kind = "alarm_p"
    min_encoders = 2
    conditional_adapter = "identity"
    counted_streams = "main"

    @classmethod
    def fusion_prefix(cls, cc: ConnectorConfig, n_encoders: int) -> int:
        return cc.perceiver_latents * (n_encoders - 1) + 2

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kinds = stream_adapters(cc, len(encoders), self.conditional_adapter)
        pcfg = PerceiverConfig(
            n_latents=cc.perceiver_latents, d=cc.perceiver_dim, cross_heads=cc.perceiver_cross_heads,
            self_heads=cc.perceiver_heads, self_layers_per_block=cc.perceiver_block_layers,
            self_blocks=cc.perceiver_blocks, cross_layers=cc.perceiver_cross_layers,
            shared_blocks=cc.perceiver_shared, shared_cross=cc.perceiver_shared, widening=cc.perceiver_widening,
            dropout=cc.dropout)
        cond_dims = tuple(e.dim if k == "identity" else llm_dim for k, e in zip(kinds[1:], encoders[1:]))
        self._finish(cc, encoders, len(encoders), llm_dim, kw, raw_conditional=True, fusion=lambda: PerceiverFusion(
            PerceiverFusionConfig(llm_dim=llm_dim, cond_dims=cond_dims, perceiver=pcfg), **kw))

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        outs, lengths = self.adapt(states, audio_samples)
        main, *conds = outs
        cmasks = [jnp.arange(c.shape[1])[None] < n[:, None] for c, n in zip(conds, lengths[1:])]
        fused = self.fusion(main, conds, cmasks)
        return self.boundary(fused, maximum(lengths[0] + self.fusion.n_extra_tokens, 1))
