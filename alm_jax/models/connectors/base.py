"""The one shape every connector has, and the one rule from valid audio samples to audio tokens.

A connector kind is a class registered in `alm_jax/models/connectors/__init__.py::CONNECTORS`:

    cls.token_rule(cc, n_encoders) -> TokenRule   # audio tokens of a clip, from the config alone
    cls.resolve_config(cc, encoder_heads) -> cc   # encoder-dependent defaults filled in (DeSTA: the heads)
    cls(cc, encoders, llm_dim, dtype=, param_dtype=, rngs=)   # encoders: EncoderInfo per configured encoder
                                                  # (+ scan_layers=, remat= when cls.layer_stack)
    conn.encoder_taps -> ((entry, ...), ...)      # per encoder it reads (0..k-1): the state entries it reads
    conn(states, audio_samples) -> [N, M, llm_dim]

`states[i]` is encoder i's list of per-layer states (each `[N, frames, enc_dim]`, the list the taps
index), for every encoder the connector reads; `audio_samples [N]` are the clips' valid 16 kHz samples.
Row n's first `token_rule(audio_samples[n])` outputs are its tokens (the rest is padding; `M` is whatever
the clip buffer gives). The data pipeline reserves exactly `token_rule(samples)` placeholder positions
per clip, so both sides count with the same object.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax
from flax import nnx

from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TokenRule:
    """valid samples -> LLM tokens of one clip (picklable; ints or integer arrays).

    `fixed > 0`: a query-based connector (DeSTA Q-Former, MATS mapper) gives `fixed` tokens whatever
    the length. Otherwise ALARM's count (`llm_audio_wrapper.get_audio_embeddings`): each encoder stream i with
    `downsample[i] > 0` gives `encoder_frames(n, kind_i) // downsample[i]` tokens (the conv adapter halves: 2;
    MLP / identity: 1; 0 = the stream does not set the length), the fused length is their maximum, plus
    `prefix` (fusion tokens before the stream: ALARM-P's latents and separators), at least 1; then + `extra`
    (the learned start/end boundary). The kinds are `stream_frames` (every encoder's kind; `token_rule_for`
    sets them, and `frames`, encoder 0's kind), counted under `stream_conventions` (every encoder's
    `input_convention`; missing entries: "native")."""
    fixed: int = 0
    extra: int = 0
    frames: str = "whisper"
    downsample: tuple[int, ...] = (2,)
    prefix: int = 0
    stream_frames: tuple[str, ...] = ()
    stream_conventions: tuple[str, ...] = ()

    def __call__(self, num_samples):
        if self.fixed > 0:
            return self.fixed if isinstance(num_samples, int) else num_samples * 0 + self.fixed
        kinds = self.stream_frames or (self.frames,)
        t = None
        for i, d in enumerate(self.downsample):
            if d <= 0:
                continue
            if i >= len(kinds):
                raise ConfigError(f"TokenRule: stream {i} counts tokens but only {len(kinds)} encoder kinds are "
                                  "known; build the rule with token_rule_for(cls, cc, encoders)")
            convention = self.stream_conventions[i] if i < len(self.stream_conventions) else "native"
            n = encoder_frames(num_samples, kinds[i], convention) // d
            t = n if t is None else maximum(t, n)
        if t is None:
            raise ConfigError("TokenRule: no stream counts tokens (every downsample entry is 0)")
        return maximum(t + self.prefix, 1) + self.extra


def maximum(a, b):
    """Element-wise max of ints or integer numpy / JAX arrays (whichever `a` and `b` are)."""
    return a + (b > a) * (b - a)


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """What a connector needs to know of one frozen encoder: its width, the state entries its config taps
    (resolved, non-negative), how many entries its state list has, and its kind's frame rule under its input
    convention (`alm_jax.audio.features.encoder_frames(samples, frames, convention)`: valid state rows of a
    clip)."""
    dim: int
    taps: tuple[int, ...]
    n_entries: int
    frames: str = "whisper"
    convention: str = "native"


class Connector(nnx.Module):
    """Base of every connector kind (see the module docstring). Subclasses set `kind`, `min_encoders`,
    implement `token_rule` and `__call__`, and set `self.encoder_taps` in `__init__`. A kind with a layer
    stack (`models/stack.py`) sets `layer_stack` and takes `scan_layers` / `remat` (model.scan_layers,
    model.remat) as keyword arguments."""
    kind: ClassVar[str] = ""
    min_encoders: ClassVar[int] = 1
    layer_stack: ClassVar[bool] = False
    encoder_taps: tuple[tuple[int, ...], ...]

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        raise NotImplementedError

    @classmethod
    def resolve_config(cls, cc: ConnectorConfig, encoder_heads: Sequence[int]) -> ConnectorConfig:
        """`cc` with the kind's defaults written into its 0 (= "the kind's default") fields that depend on the
        encoders; `encoder_heads`: each configured encoder's attention heads (0: no single count). The base
        returns `cc` unchanged; `weights/alm_params.py` calls this before building the model."""
        return cc

    def __call__(self, states: Sequence[Sequence[jax.Array]], audio_samples: jax.Array) -> jax.Array:
        raise NotImplementedError

    def output_projection(self):
        """The `layers.Linear` whose outputs are the audio tokens (the input of `output_init: embeddings`), or
        None when the kind has no single one."""
        return None

    def encoder_valid_positions(self, audio_samples: jax.Array) -> jax.Array | None:
        """Per clip, how many leading encoder positions the encoder's self-attention may use as keys (the
        rest is padding it must not see), or None: every position (the default; Whisper was trained on the
        padded window). Qwen2-Audio's connector masks the padding."""
        return None


def token_rule_for(cls: type[Connector], cc: ConnectorConfig, encoders: Sequence[EncoderConfig]) -> TokenRule:
    """The token rule of connector class `cls` under `cc` for these encoders: the kind's rule, counting frames
    with each encoder's frame rule (its `kind`) and `input_convention`. The model and the input pipeline both
    build theirs here."""
    rule = cls.token_rule(cc, len(encoders))
    if rule.fixed > 0:
        return rule
    return dataclasses.replace(rule, frames=encoders[0].kind, stream_frames=tuple(e.kind for e in encoders),
                               stream_conventions=tuple(e.input_convention for e in encoders))
