"""The audio-language model: frozen encoder(s) -> trainable connector -> spliced into a frozen LLM.

    audio `[N, S]` (N = batch * clips) --log-mel--> frozen encoders --stop_gradient--> per-layer states
      (or audio_features `[N, n_mels, frames]`, the log-mel computed by the input pipeline on the host)
      --connector (DeSTA Q-Former | ALARM adapter [+ CA / Perceiver / sum fusion] | MATS mapper)-->
      audio tokens `[N, max_audio_tokens, llm_dim]` (valid prefix per clip)
    input_ids `[B, T]` --LLM embedding--> text embeddings; positions with audio_slot >= 0 take audio token
      audio_slot (a flat index into the N * max_audio_tokens audio tokens) --> inputs_embeds --> LLM logits

Every clip is its own span, so a sample may hold any number of clips of different lengths (fixed 64-token
spans for DeSTA, ceil(frames / 2) + 2 for ALARM). `num_audio_tokens(samples)` gives the exact span length
the input pipeline must reserve; it is a pure function of the clip's valid sample count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.audio.features import HOP_LENGTH, log_mel, num_frames
from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.errors import ConfigError
from alm_jax.models import connectors as C
from alm_jax.models.llm import DecoderLM, KVCache
from alm_jax.models.whisper import WhisperEncoder

CONNECTOR_KINDS = ("desta", "alarm", "alarm_ca", "alarm_p", "sum", "mats")


def encoder_frames(num_samples: int) -> int:
    """Whisper encoder positions for `num_samples` valid 16 kHz samples: ceil((samples // 160) / 2)."""
    return -(-(num_samples // HOP_LENGTH) // 2)


@dataclasses.dataclass(frozen=True)
class AudioTokenCount:
    """Picklable `num_audio_tokens(samples)` rule for a connector (handed to the data pipeline)."""
    kind: str
    fixed: int = 0          # desta / mats: tokens per clip
    extra: int = 0          # alarm family: boundary (+ Perceiver prefix) tokens

    def __call__(self, num_samples: int) -> int:
        if self.kind in ("desta", "mats"):
            return self.fixed
        return -(-encoder_frames(int(num_samples)) // 2) + self.extra


def _resolve_taps(taps: Sequence[int], n_layers: int, indexing: str) -> tuple[int, ...]:
    """Negative taps count from the end of the chosen list (blocks: L entries; hf: L + 1 entries)."""
    n = n_layers if indexing == "blocks" else n_layers + 1
    out = tuple(t + n if t < 0 else t for t in taps)
    if any(not 0 <= t < n for t in out):
        raise ConfigError(f"encoder taps {tuple(taps)} out of range for {n} {indexing} entries")
    return out


class AudioLanguageModel(nnx.Module):
    """Encoders (frozen) + connector (trainable) + LLM (frozen, optionally with LoRA).

    `encoders`: WhisperEncoder modules (encoder 0 is the main stream); `encoder_cfgs`: their taps,
    tap indexing ("blocks" = raw block outputs, DeSTA; "hf" = hidden_states with 0 = embeddings, ALARM) and
    padding; `connector`: what to build between them and `llm`. Connector parameters are float32
    (`param_dtype`); the computation runs in `dtype`.
    """

    def __init__(self, encoders: Sequence[WhisperEncoder], llm: DecoderLM, connector: ConnectorConfig,
                 encoder_cfgs: Sequence[EncoderConfig], *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if connector.kind not in CONNECTOR_KINDS:
            raise ConfigError(f"model.connector.kind={connector.kind!r}; choose one of {CONNECTOR_KINDS}")
        if len(encoders) != len(encoder_cfgs) or not encoders:
            raise ConfigError(f"got {len(encoders)} encoders but {len(encoder_cfgs)} encoder configs")
        if connector.kind in ("alarm_ca", "alarm_p", "sum") and len(encoders) < 2:
            raise ConfigError(f"connector {connector.kind!r} fuses several encoders; configure at least two")
        self.encoders = nnx.List(list(encoders))
        self.llm = llm
        self.kind = connector.kind
        self.encoder_cfgs = tuple(encoder_cfgs)
        self.dtype = dtype
        self.taps = tuple(_resolve_taps(c.taps, e.config.encoder_layers, c.tap_indexing)
                          for e, c in zip(encoders, encoder_cfgs))
        self.connector = _build_connector(connector, encoders, self.taps, llm.cfg.hidden_size, dtype, param_dtype, rngs)
        self.token_count = _token_count(connector, self.connector)

    # ---- audio side

    def encoder_states(self, i: int, audio: jax.Array | None = None,
                       features: jax.Array | None = None) -> list[jax.Array]:
        """Encoder i on waveforms `[N, S]` (log-mel computed here) or on precomputed log-mel `features`
        `[N, n_mels, frames]` (the pipeline's host option) -> the list its taps index (block outputs or HF
        hidden_states), each `[N, frames', d]`, under stop_gradient (frozen: no backward pass through it)."""
        enc, cfg = self.encoders[i], self.encoder_cfgs[i]
        if features is not None:
            feats = self._check_features(i, features)
        elif audio is not None:
            feats = log_mel(audio, n_mels=enc.config.num_mel_bins, pad_to_seconds=cfg.pad_to_seconds)
        else:
            raise ConfigError("encoder_states needs audio waveforms [N, S] or log-mel features [N, n_mels, frames]")
        out = enc(feats.astype(enc.dtype))
        states = out.block_outputs if cfg.tap_indexing == "blocks" else out.hidden_states
        return [jax.lax.stop_gradient(s) for s in states]

    def _check_features(self, i: int, features: jax.Array) -> jax.Array:
        """Precomputed features must have the shape encoder i's own log-mel would give."""
        enc, cfg = self.encoders[i], self.encoder_cfgs[i]
        if features.ndim != 3 or features.shape[1] != enc.config.num_mel_bins:
            raise ConfigError(f"audio_features of shape {tuple(features.shape)} do not fit encoder {i}, which "
                              f"takes [N, {enc.config.num_mel_bins}, frames]; build them with "
                              f"n_mels={enc.config.num_mel_bins} (or turn the host features option off)")
        if cfg.pad_to_seconds is not None:
            want = num_frames(0, pad_to_seconds=cfg.pad_to_seconds)
            if features.shape[2] != want:
                raise ConfigError(f"audio_features have {features.shape[2]} frames but encoder {i} pads to "
                                  f"{cfg.pad_to_seconds} s ({want} frames); build them with the same "
                                  "pad_to_seconds as the encoder")
        return features

    def audio_tokens(self, audio: jax.Array | None, audio_samples: jax.Array,
                     features: jax.Array | None = None) -> jax.Array:
        """audio `[N, S]` float32 (or log-mel `features` `[N, n_mels, frames]` instead; `audio` may then be
        None), audio_samples `[N]` valid samples -> `[N, max_audio_tokens, llm_dim]` where clip n's first
        `num_audio_tokens(audio_samples[n])` rows are its tokens. Host features serve every encoder, so
        they must fit each one's mel bins and padding."""
        main = self.encoder_states(0, audio, features)
        frames = (audio_samples // HOP_LENGTH + 1) // 2
        conn = self.connector
        if self.kind == "desta":
            return conn(main)
        if self.kind == "mats":
            last = main[-1]
            valid = (jnp.arange(last.shape[1])[None] < frames[:, None]).astype(jnp.float32)
            pooled = (last.astype(jnp.float32) * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1), 1.0)[:, None]
            return conn(pooled)
        tokens = conn.adapters[0](main)                       # [N, ceil(F/2), llm_dim]
        lengths = (frames + 1) // 2
        if self.kind == "alarm":
            return conn.boundary(tokens, lengths)
        others = [self.encoder_states(i, audio, features) for i in range(1, len(self.encoders))]
        conds = [a(s) for a, s in zip(conn.adapters[1:], others)]
        if self.kind == "sum":
            return conn.boundary(conn.fusion([tokens] + conds), lengths)
        if self.kind == "alarm_ca":
            tmask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
            cmasks = [jnp.arange(c.shape[1])[None] < lengths[:, None] for c in conds]
            return conn.boundary(conn.fusion(tokens, conds, tmask, cmasks), lengths)
        # alarm_p: [start] + [cond_start, latents..., cond_end] + main + [end]
        cmasks = [jnp.arange(c.shape[1])[None] < frames[:, None] for c in conds]
        fused = conn.fusion(tokens, conds, cmasks)
        return conn.boundary(fused, lengths + conn.fusion.n_extra_tokens)

    def num_audio_tokens(self, num_samples: int) -> int:
        return self.token_count(num_samples)

    # ---- splicing and the LLM

    def embed_inputs(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Text embeddings with audio tokens written at `audio_slot >= 0` -> `[B, T, llm_dim]`. The audio
        comes from `batch["audio_features"]` (host log-mel) when present, else `batch["audio"]`."""
        text = self.llm.embed(batch["input_ids"])
        slot = batch["audio_slot"]
        if "audio_features" in batch:
            tokens = self.audio_tokens(None, batch["audio_samples"], features=batch["audio_features"])
        elif "audio" in batch:
            tokens = self.audio_tokens(batch["audio"], batch["audio_samples"])
        else:
            return text
        flat = tokens.reshape(-1, tokens.shape[-1]).astype(text.dtype)
        picked = jnp.take(flat, jnp.maximum(slot, 0), axis=0)
        return jnp.where((slot >= 0)[..., None], picked, text)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Logits `[B, T, vocab]` float32 for a pipeline batch (see alm_jax/data/pipeline.py)."""
        return self.llm(inputs_embeds=self.embed_inputs(batch), attention_mask=batch.get("attention_mask"))


class _Connector(nnx.Module):
    """Holds the trainable pieces under one name (`connector`), so one path filter selects them."""

    def __init__(self, **parts):
        for k, v in parts.items():
            setattr(self, k, nnx.List(v) if isinstance(v, list) else v)

    def __call__(self, x):
        return self.main(x)


def _build_connector(cc: ConnectorConfig, encoders, taps, llm_dim, dtype, param_dtype, rngs) -> nnx.Module:
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [e.config.d_model for e in encoders]
    if cc.kind == "desta":
        hidden = cc.hidden or dims[0]
        qcfg = C.QFormerConfig(taps=taps[0], n_queries=cc.num_queries, hidden=hidden, heads=cc.num_heads,
                               intermediate=cc.intermediate or 4 * hidden, layers=cc.num_layers, enc_dim=dims[0],
                               llm_dim=llm_dim, dropout=0.0, attention_dropout=0.0)
        return C.QFormerConnector(qcfg, **kw)
    if cc.kind == "mats":
        mcfg = C.ClipCapMapperConfig(clip_dim=dims[0], d=cc.hidden or dims[0], clip_length=cc.mapper_tokens,
                                     prefix_length=cc.mapper_tokens, layers=cc.num_layers, heads=cc.num_heads,
                                     llm_dim=llm_dim)
        return C.ClipCapMapper(mcfg, **kw)
    hidden = cc.adapter_dim
    adapters = [C.AlarmAdapter(C.AlarmAdapterConfig(layers=taps[0], enc_dim=dims[0], hidden=hidden,
                                                    conv_dim=2 * hidden, llm_dim=llm_dim, norm=cc.norm), **kw)]
    parts: dict[str, Any] = {}
    if cc.kind in ("alarm_ca", "sum"):
        adapters += [C.AlarmAdapter(C.AlarmAdapterConfig(layers=t, enc_dim=d, hidden=hidden, conv_dim=2 * hidden,
                                                         llm_dim=llm_dim, norm=cc.norm), **kw)
                     for t, d in zip(taps[1:], dims[1:])]
    if cc.kind == "alarm_ca":
        d = cc.hidden or hidden
        parts["fusion"] = C.CrossAttentionFusion(C.CrossAttentionFusionConfig(
            llm_dim=llm_dim, d=d, heads=cc.num_heads, ffn=cc.intermediate or 4 * d, dropout=0.0,
            layers_per_stream=(cc.num_layers,) * (len(encoders) - 1)), **kw)
    elif cc.kind == "sum":
        parts["fusion"] = C.SumFusion()
    elif cc.kind == "alarm_p":
        adapters += [C.IdentityAdapter(C.IdentityAdapterConfig(layers=t, enc_dim=d), dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs) for t, d in zip(taps[1:], dims[1:])]
        d = cc.hidden or hidden
        pcfg = C.PerceiverConfig(n_latents=cc.perceiver_latents, d=d, cross_heads=cc.num_heads,
                                 self_heads=cc.num_heads, self_layers_per_block=cc.num_layers, self_blocks=1)
        parts["fusion"] = C.PerceiverFusion(C.PerceiverFusionConfig(llm_dim=llm_dim, cond_dims=tuple(dims[1:]),
                                                                    perceiver=pcfg), **kw)
    parts["adapters"] = adapters
    parts["boundary"] = C.AudioBoundary(llm_dim, **kw)
    return _Connector(**parts)


def _token_count(cc: ConnectorConfig, conn) -> AudioTokenCount:
    if cc.kind == "desta":
        return AudioTokenCount("desta", fixed=cc.num_queries)
    if cc.kind == "mats":
        return AudioTokenCount("mats", fixed=cc.mapper_tokens)
    extra = 2 + (conn.fusion.n_extra_tokens if cc.kind == "alarm_p" else 0)
    return AudioTokenCount(cc.kind, extra=extra)


# ---- trainable / frozen filters

TRAINABLE = nnx.Any(nnx.All(nnx.Param, nnx.PathContains("connector")), nnx.LoRAParam)
"""Connector parameters and LoRA adapters. Everything else (encoders, LLM base weights) is frozen."""


def split_trainable(model: AudioLanguageModel):
    """`(graphdef, trainable_state, frozen_state)` for the train step."""
    return nnx.split(model, TRAINABLE, ...)


# ---- generation

def generate(model: AudioLanguageModel, batch: dict[str, jax.Array], *, max_new_tokens: int = 64,
             eos_id: int | None = None) -> jax.Array:
    """Greedy answers `[B, max_new_tokens]` int32 for a left-padded prompt batch (input_ids, attention_mask,
    audio_slot, audio or audio_features, audio_samples; see `alm_jax.data.pipeline.collate_prompts`): the
    audio + text prompt is prefilled into the LLM's KV cache, then decoded token by token (rows that emit
    `eos_id` stop)."""
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, dict(batch), max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "eos_id"))
def _generate(graphdef, state, batch, *, max_new_tokens, eos_id):
    from alm_jax.models.llm import greedy_decode
    model = nnx.merge(graphdef, state)
    return greedy_decode(model.llm, model.embed_inputs(batch), batch["attention_mask"].astype(bool),
                         max_new_tokens=max_new_tokens, eos_id=eos_id)
