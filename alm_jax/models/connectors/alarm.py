"""The ALARM family of connector kinds: per-encoder adapters (half the encoder frame rate), optional fusion
of several encoders, and learned start/end boundary tokens around each clip.

    alarm     encoder 0 -> AlarmAdapter -> boundary                                   ceil(F/2) + 2 tokens
    sum       every encoder -> its AlarmAdapter -> element-wise sum -> boundary        ceil(F/2) + 2
    alarm_ca  encoder 0 adapted = queries; every other adapted encoder refines it by
              cross-attention (CrossAttentionFusion) -> boundary                       ceil(F/2) + 2
    alarm_p   other encoders (raw states) -> one Perceiver each (latents) prefixed to
              the adapted encoder 0 -> boundary                                        ceil(F/2) + 2 + L*(E-1) + 2

F = encoder 0's frames for the clip's valid samples (`alm_jax.audio.features.encoder_frames` with encoder 0's
rule; every other stream is masked by its own encoder's rule), L = Perceiver latents, E = encoders.
Outputs `[N, M, llm_dim]`; rows past a clip's count are zero padding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig
from alm_jax.models.connectors.alarm_adapter import (
    AlarmAdapter, AlarmAdapterConfig, IdentityAdapter, IdentityAdapterConfig)
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule
from alm_jax.models.connectors.fusion import (
    AudioBoundary, CrossAttentionFusion, CrossAttentionFusionConfig, PerceiverConfig, PerceiverFusion,
    PerceiverFusionConfig, SumFusion)



class _AlarmFamily(Connector):
    """Shared construction: `self.adapters` (an AlarmAdapter for encoder 0 and for each adapted other
    encoder), `self.fusion` (or none), `self.boundary`."""

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        return TokenRule(extra=2)

    def _adapter(self, cc: ConnectorConfig, enc: EncoderInfo, llm_dim: int, kw) -> AlarmAdapter:
        h = cc.adapter_dim
        return AlarmAdapter(AlarmAdapterConfig(layers=enc.taps, enc_dim=enc.dim, hidden=h, conv_dim=2 * h,
                                               llm_dim=llm_dim, norm=cc.norm), **kw)

    def _finish(self, adapters: list, encoders: Sequence[EncoderInfo], n_read: int, llm_dim: int, kw) -> None:
        self.adapters = nnx.List(adapters)
        self.boundary = AudioBoundary(llm_dim, **kw)
        self.encoder_taps = tuple(e.taps for e in encoders[:n_read])
        self.frame_rules = tuple(e.frames for e in encoders[:n_read])

    def adapted(self, audio_samples: jax.Array, i: int = 0) -> jax.Array:
        """Valid adapter outputs `[N]` of encoder i's stream: ceil(its frames / 2)."""
        return TokenRule(frames=self.frame_rules[i])(audio_samples)


class AlarmConnector(_AlarmFamily):
    """Registry kind `alarm`: one encoder, its adapter, boundary tokens."""
    kind = "alarm"

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._finish([self._adapter(cc, encoders[0], llm_dim, kw)], encoders, 1, llm_dim, kw)

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        return self.boundary(self.adapters[0](states[0]), self.adapted(audio_samples))


class SumConnector(_AlarmFamily):
    """Registry kind `sum`: every encoder adapted to the LLM width, summed element-wise, boundary tokens."""
    kind = "sum"
    min_encoders = 2

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        adapters = [self._adapter(cc, e, llm_dim, kw) for e in encoders]
        self.fusion = SumFusion()
        self._finish(adapters, encoders, len(encoders), llm_dim, kw)

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        streams = [a(s) for a, s in zip(self.adapters, states)]
        return self.boundary(self.fusion(streams), self.adapted(audio_samples))


class AlarmCAConnector(_AlarmFamily):
    """Registry kind `alarm_ca`: adapted encoder 0 refined by cross-attention to every other adapted encoder
    (`num_layers` decoder layers per stream); keeps encoder 0's length."""
    kind = "alarm_ca"
    min_encoders = 2

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        adapters = [self._adapter(cc, e, llm_dim, kw) for e in encoders]
        d = cc.hidden or cc.adapter_dim
        self.fusion = CrossAttentionFusion(CrossAttentionFusionConfig(
            llm_dim=llm_dim, d=d, heads=cc.num_heads, ffn=cc.intermediate or 4 * d, dropout=cc.dropout,
            layers_per_stream=(cc.num_layers,) * (len(encoders) - 1)), **kw)
        self._finish(adapters, encoders, len(encoders), llm_dim, kw)

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        lengths = [self.adapted(audio_samples, i) for i in range(len(states))]
        main, *conds = [a(s) for a, s in zip(self.adapters, states)]
        valid = lambda x, n: jnp.arange(x.shape[1])[None] < n[:, None]   # noqa: E731
        cmasks = [valid(c, n) for c, n in zip(conds, lengths[1:])]
        return self.boundary(self.fusion(main, conds, valid(main, lengths[0]), cmasks), lengths[0])


class AlarmPConnector(_AlarmFamily):
    """Registry kind `alarm_p`: each other encoder's raw tapped states -> its own Perceiver (L latents) ->
    `[cond_start, latents..., cond_end]` prefixed to adapted encoder 0 -> boundary tokens."""
    kind = "alarm_p"
    min_encoders = 2

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        return TokenRule(extra=2 + cc.perceiver_latents * (n_encoders - 1) + 2)

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        adapters = [self._adapter(cc, encoders[0], llm_dim, kw)]
        adapters += [IdentityAdapter(IdentityAdapterConfig(layers=e.taps, enc_dim=e.dim), **kw) for e in encoders[1:]]
        d = cc.hidden or cc.adapter_dim
        pcfg = PerceiverConfig(n_latents=cc.perceiver_latents, d=d, cross_heads=cc.num_heads,
                               self_heads=cc.num_heads, self_layers_per_block=cc.num_layers, self_blocks=1)
        self.fusion = PerceiverFusion(PerceiverFusionConfig(llm_dim=llm_dim, cond_dims=tuple(e.dim for e in encoders[1:]),
                                                            perceiver=pcfg), **kw)
        self._finish(adapters, encoders, len(encoders), llm_dim, kw)

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        main, *conds = [a(s) for a, s in zip(self.adapters, states)]
        frames = [encoder_frames(audio_samples, rule) for rule in self.frame_rules[1:]]
        cmasks = [jnp.arange(c.shape[1])[None] < f[:, None] for c, f in zip(conds, frames)]
        fused = self.fusion(main, conds, cmasks)
        return self.boundary(fused, self.adapted(audio_samples) + self.fusion.n_extra_tokens)
