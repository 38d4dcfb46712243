"""The Qwen2-Audio connector kind `qwen2_audio`: the part of Qwen2-Audio that sits between its Whisper-style
encoder blocks and its LLM, so that a run with it exports as a `Qwen2AudioForConditionalGeneration`
(`alm_jax/export/qwen2_audio.py`).

    encoder 0's last raw block output `[N, F, d_audio]` (tap_indexing "blocks", taps [-1]; F = 1500 for the 30 s window)
      -> AvgPool1d(2, stride 2) over time (an odd F drops its last row, as torch does) `[N, F // 2, d_audio]`
      -> LayerNorm(d_audio)          (trainable; exported as Qwen2-Audio's `audio_tower.layer_norm`)
      -> Linear(d_audio -> llm_dim)  (with bias; exported as `multi_modal_projector.linear`)
      -> `[N, F // 2, llm_dim]`, row n's first `token_rule(audio_samples[n])` rows its tokens, the rest zeros.

The Whisper encoder's own final LayerNorm is not used (Qwen2-Audio pools the last block's raw output and
normalizes after the pool). Tokens per clip of n valid 16 kHz samples, as `Qwen2AudioProcessor` counts them from
the `feature_attention_mask` of `WhisperFeatureExtractor` (`Qwen2AudioEncoder._get_feat_extract_output_lengths`):
L = min(ceil(n / 160), 3000) mel frames, ceil(L / 2) encoder positions, floor(ceil(L / 2) / 2) tokens
(`PooledTokenRule`; e.g. 1 s: 25, 30 s: 750).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.audio.features import HOP_LENGTH, encoder_frames
from alm_jax.config import ConnectorConfig
from alm_jax.errors import ConfigError
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule
from alm_jax.models.layers import LayerNorm, Linear

WINDOW_SAMPLES = 30 * 16000   # Qwen2-Audio's feature extractor window (longer clips are cut to it)
LAYER_NORM_EPS = 1e-5         # torch nn.LayerNorm's default, which Qwen2AudioEncoder.layer_norm uses


@dataclasses.dataclass(frozen=True)
class PooledTokenRule(TokenRule):
    """Qwen2-Audio's token count: `encoder_frames(min(n, window) + 159) // 2` (the `+ 159` turns our
    `n // 160` mel frames into the extractor's `ceil(n / 160)`; `// 2` is the stride-2 average pool, floor).
    `extra` tokens are added as in `TokenRule`. Ints and integer numpy/JAX arrays alike."""
    window: int = WINDOW_SAMPLES

    def positions(self, num_samples):
        """Encoder positions Qwen2-Audio counts as valid (and lets its encoder attend to):
        ceil(L / 2), L = min(ceil(n / 160), window / 160)."""
        n = (num_samples > self.window) * self.window + (num_samples <= self.window) * num_samples
        return encoder_frames(n + HOP_LENGTH - 1, self.frames)

    def __call__(self, num_samples):
        return self.positions(num_samples) // 2 + self.extra


class Qwen2AudioConnector(Connector):
    """Registry kind `qwen2_audio` (see the module docstring). Needs exactly one Whisper encoder whose single
    tap is its last state entry (configure `tap_indexing: blocks`, `taps: [-1]`: the raw output of the last
    block; with "hf" indexing the last entry is already layer-normalized and the export refuses the run)."""
    kind = "qwen2_audio"

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        return PooledTokenRule()

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(encoders) != 1 or encoders[0].frames != "whisper":
            kinds = [e.frames for e in encoders]
            raise ConfigError(f"connector 'qwen2_audio' reads one Whisper encoder (Qwen2-Audio's audio tower), but "
                              f"the model has encoders {kinds}; configure exactly one encoder of kind whisper")
        enc = encoders[0]
        if enc.convention != "native":
            raise ConfigError(f"connector 'qwen2_audio' counts Qwen2-Audio's own extractor's frames; "
                              f"model.encoders.0.input_convention={enc.convention!r} is another model's: set it "
                              "to native")
        if enc.taps != (enc.n_entries - 1,):
            raise ConfigError(f"connector 'qwen2_audio' reads the last block of the encoder only; its taps resolve to "
                              f"{enc.taps} of {enc.n_entries} entries. Set model.encoders.0.taps=[-1] and "
                              "model.encoders.0.tap_indexing=blocks")
        self.encoder_taps = (enc.taps,)
        self.rule = PooledTokenRule(frames=enc.frames)
        self.norm = LayerNorm(enc.dim, eps=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.proj = Linear(enc.dim, llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def encoder_valid_positions(self, audio_samples: jax.Array) -> jax.Array:
        """Encoder positions `[N]` Qwen2-Audio lets its encoder's self-attention see for these clips:
        ceil(L / 2), L = min(ceil(n / 160), 3000) (it masks the keys past them). Our WhisperEncoder does
        not mask yet; this is the length such a key mask needs to reproduce Qwen2-Audio on short clips."""
        return self.rule.positions(audio_samples)

    def __call__(self, states: Sequence[Sequence[jax.Array]], audio_samples: jax.Array) -> jax.Array:
        """states[0][tap] `[N, F, d_audio]`, audio_samples `[N]` -> `[N, F // 2, llm_dim]` (rows past a clip's
        token count are zero)."""
        x = states[0][self.encoder_taps[0][0]]
        n, f, d = x.shape
        pooled = x[:, :f // 2 * 2].astype(jnp.float32).reshape(n, f // 2, 2, d).mean(axis=2)
        out = self.proj(self.norm(pooled))
        valid = jnp.arange(f // 2)[None, :] < self.rule(audio_samples)[:, None]
        return jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
