"""The audio-language model: frozen encoder(s) -> trainable connector -> spliced into a frozen LLM.

    audio `[N, S]` (N = batch * clips) --each encoder's own features (Whisper: log-mel; W2V-BERT: stacked fbank
      + attention mask from the valid samples)--> frozen encoders --stop_gradient--> per-layer states
      (or audio_features `[N, n_mels, frames]`, the Whisper log-mel computed by the input pipeline on the host)
      --connector (a registered kind, `models/connectors`: DeSTA Q-Former | ALARM adapter [+ fusion] | MATS)-->
      audio tokens `[N, M, llm_dim]` (valid prefix per clip; N = B * C clips, C per sample)
    input_ids `[B, T]` --LLM embedding--> text embeddings; where `audio_clip[b, t] >= 0` the position takes
      audio token `audio_pos[b, t]` of clip `audio_clip[b, t]` of row b --> inputs_embeds --> LLM logits
    (MATS text-only training: a slot's tokens come from its caption instead, `caption_ids [N, L]` --CLAP's frozen
      text tower (encoder 0)--> text embedding --connector.from_text (noise injection, mapper)--> `[N, M, llm_dim]`)
    (DeSTA2.5 transcripts, `model.connector.transcript_tokens`: the ids of a clip's transcript follow its span in
      `input_ids` as text positions (`audio_clip` -1), so the LLM embedding above writes `embed(transcript)` after
      the clip's audio tokens, DeSTA's `_prepare_inputs_for_llm`; the pipeline places them, nothing here changes)

`audio_clip`/`audio_pos` are row-local (the pipeline writes them per sample; nothing rewrites them when
rows are concatenated into a global batch), and `M` never crosses the interface: the model decodes with
its own output shape. Every clip is its own span, so a sample may hold any number of clips of different
lengths (fixed spans for DeSTA/MATS, max(frames // 2, 1) + 2 for ALARM). `token_rule(samples)` (the
connector's `TokenRule`) gives the exact span length the input pipeline reserves.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.audio.fbank import ALARM_EDGE_PAD, w2v_bert_features
from alm_jax.audio.features import INPUT_CONVENTIONS, log_mel, num_frames, window_samples
from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.errors import ConfigError
from alm_jax.models.clap import ClapAudioTower
from alm_jax.models.connectors import EncoderInfo, connector_class, token_rule_for
from alm_jax.models.llm import DecoderLM
from alm_jax.models.w2v_bert import W2VBertModel
from alm_jax.models.whisper import WhisperEncoder

ENCODER_MODULES = {"whisper": WhisperEncoder, "w2v_bert": W2VBertModel,   # EncoderConfig.kind -> module class
                   "clap": ClapAudioTower}


def _resolve_taps(taps: Sequence[int], n_entries: int, indexing: str) -> tuple[int, ...]:
    """Negative taps count from the end of the chosen list (blocks: L entries; hf: L + 1 entries)."""
    out = tuple(t + n_entries if t < 0 else t for t in taps)
    if any(not 0 <= t < n_entries for t in out):
        raise ConfigError(f"encoder taps {tuple(taps)} out of range for {n_entries} {indexing} entries")
    return out


def encoder_info(encoder, cfg: EncoderConfig) -> EncoderInfo:
    """Width, resolved taps and state-list length of a frozen encoder under its config (a CLAP tower has one
    entry, its clip embedding)."""
    if cfg.kind == "clap":
        return EncoderInfo(dim=encoder.d_model, taps=_resolve_taps(cfg.taps, 1, cfg.tap_indexing), n_entries=1,
                           frames=cfg.kind, convention=cfg.input_convention)
    n_layers = encoder.config.encoder_layers
    n_entries = n_layers if cfg.tap_indexing == "blocks" else n_layers + 1
    return EncoderInfo(dim=encoder.config.d_model, taps=_resolve_taps(cfg.taps, n_entries, cfg.tap_indexing),
                       n_entries=n_entries, frames=cfg.kind, convention=cfg.input_convention)


class AudioLanguageModel(nnx.Module):
    """Encoders (frozen) + connector (trainable) + LLM (frozen, optionally with LoRA).

    `encoders`: WhisperEncoder / W2VBertModel modules, as `encoder_cfgs[i].kind` says (encoder 0 is the main
    stream); `encoder_cfgs`: their kinds, taps,
    tap indexing ("blocks" = raw block outputs, DeSTA; "hf" = hidden_states with 0 = embeddings, ALARM) and
    padding; `connector`: what to build between them and `llm`. Connector parameters are float32
    (`param_dtype`); the computation runs in `dtype`. `scan_layers` / `remat` go to a connector with a layer
    stack (`Connector.layer_stack`; encoders and LLM come built).
    """

    def __init__(self, encoders: Sequence[WhisperEncoder | W2VBertModel], llm: DecoderLM, connector: ConnectorConfig,
                 encoder_cfgs: Sequence[EncoderConfig], *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, scan_layers: bool = True, remat: str = "none"):
        cls = connector_class(connector.kind)
        if len(encoders) != len(encoder_cfgs) or not encoders:
            raise ConfigError(f"got {len(encoders)} encoders but {len(encoder_cfgs)} encoder configs")
        if len(encoders) < cls.min_encoders:
            raise ConfigError(f"connector {connector.kind!r} fuses several encoders; configure at least "
                              f"{cls.min_encoders} (model.encoders)")
        for i, (e, c) in enumerate(zip(encoders, encoder_cfgs)):
            want = ENCODER_MODULES.get(c.kind)
            if want is None or not isinstance(e, want):
                modules = ", ".join(f"{k}: {m.__name__}" for k, m in ENCODER_MODULES.items())
                raise ConfigError(f"model.encoders.{i}.kind={c.kind!r} but encoder {i} is a {type(e).__name__}; "
                                  f"set the kind that matches the module ({modules})")
            if c.window_seconds is not None and (c.kind != "whisper" or c.pad_to_seconds is not None):
                raise ConfigError(f"model.encoders.{i}.window_seconds={c.window_seconds} windows a Whisper encoder's "
                                  "trimmed clip buffer; use it with kind whisper and pad_to_seconds null")
            if c.input_convention not in INPUT_CONVENTIONS or (c.input_convention == "alarm"
                                                               and c.kind not in ("whisper", "w2v_bert")):
                raise ConfigError(f"model.encoders.{i}.input_convention={c.input_convention!r} with kind {c.kind!r}: "
                                  "use native (the encoder's own extractor), or alarm (ALARM's Whisper / W2V-BERT "
                                  "inputs) with kind whisper or w2v_bert")
        self.encoders = nnx.List(list(encoders))
        self.llm = llm
        self.encoder_cfgs = tuple(encoder_cfgs)
        self.dtype = dtype
        infos = [encoder_info(e, c) for e, c in zip(encoders, encoder_cfgs)]
        stack_kw = dict(scan_layers=scan_layers, remat=remat) if cls.layer_stack else {}
        self.connector = cls(connector, infos, llm.cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             **stack_kw)
        self.token_rule = token_rule_for(cls, connector, encoder_cfgs)
        if connector.output_init == "embeddings":
            match_embedding_scale(self.connector, llm, connector.kind)

    # ---- audio side

    def encoder_states(self, i: int, audio: jax.Array | None = None, features: jax.Array | None = None,
                       audio_samples: jax.Array | None = None) -> list[jax.Array]:
        """Encoder i on waveforms `[N, S]` (its own features computed here) or, for Whisper, on precomputed
        log-mel `features` `[N, n_mels, frames]` (the pipeline's host option) -> the list its taps index, each
        `[N, frames', d]`, under stop_gradient (frozen: no backward pass through it). `audio_samples` `[N]`:
        valid samples (default all S). Per kind (`ENCODER_STATES`): Whisper block outputs or HF hidden_states;
        W2V-BERT the same from its on-device fbank + attention mask, frames' = ceil(F / 2), F = 1 + (S - 400)
        // 160 (S + 320 under `input_convention: alarm`, the buffer zero-padded by 160 samples on each side);
        CLAP one entry, the clip embedding `[N, 1, projection_dim]`. Valid rows: `encoder_frames(samples, kind,
        input_convention)`."""
        cfg = self.encoder_cfgs[i]
        if audio is not None and audio_samples is None:
            audio_samples = jnp.full((audio.shape[0],), audio.shape[1], jnp.int32)
        states = ENCODER_STATES[cfg.kind](self, i, audio, features, audio_samples)
        return [jax.lax.stop_gradient(s) for s in states]

    def _whisper_states(self, i, audio, features, audio_samples):
        enc, cfg = self.encoders[i], self.encoder_cfgs[i]
        if cfg.window_seconds is not None:
            return self._whisper_window_states(i, audio, features, audio_samples)
        if features is not None:
            feats = self._check_features(i, features)
        elif audio is not None:
            feats = log_mel(audio, n_mels=enc.config.num_mel_bins, pad_to_seconds=cfg.pad_to_seconds)
        else:
            raise ConfigError("encoder_states needs audio waveforms [N, S] or log-mel features [N, n_mels, frames]")
        valid = self.connector.encoder_valid_positions(audio_samples) if audio_samples is not None else None
        out = enc(feats.astype(enc.dtype), valid_positions=valid, keep=self.tapped_blocks(i))
        return out.block_outputs if cfg.tap_indexing == "blocks" else out.hidden_states

    def _whisper_window_states(self, i, audio, features, audio_samples):
        """ALARM's Whisper input (`window_seconds`): the buffer `[N, S]` cut into W = ceil(S / window) windows, each
        padded to the window, its log-mel taken alone (the extractor's per-piece floor) and encoded alone; a
        window wholly past a clip's end enters as zero features (ALARM's batch padding of features). The
        windows' states, concatenated in time: `[N, W * window frames, d]`; valid rows as `encoder_frames`."""
        enc, cfg = self.encoders[i], self.encoder_cfgs[i]
        if audio is None or features is not None:
            raise ConfigError(f"model.encoders.{i}.window_seconds encodes windows of the waveforms; host log-mel "
                              "features are not windowed: set data.host_features=false")
        win = window_samples(cfg.window_seconds, 16000)   # the 16 kHz clip buffer
        n, s = audio.shape
        w = -(-s // win)
        pieces = jnp.pad(audio, ((0, 0), (0, w * win - s))).reshape(n * w, win)
        samples = jnp.clip(audio_samples[:, None] - win * jnp.arange(w)[None], 0, win).reshape(n * w)
        feats = log_mel(pieces, n_mels=enc.config.num_mel_bins, pad_to_seconds=cfg.window_seconds)
        feats = jnp.where((samples > 0)[:, None, None], feats, 0.0)
        valid = self.connector.encoder_valid_positions(samples)
        out = enc(feats.astype(enc.dtype), valid_positions=valid, keep=self.tapped_blocks(i))
        states = out.block_outputs if cfg.tap_indexing == "blocks" else out.hidden_states
        return [x.reshape(n, w * x.shape[1], *x.shape[2:]) for x in states]

    def tapped_blocks(self, i: int) -> tuple[int, ...]:
        """The Whisper blocks whose outputs encoder i's taps read: a "blocks" tap t is block t; an "hf" tap t
        is block t - 1 (t = 0, the embeddings, needs none; t = L, after the final LayerNorm, needs the last)."""
        taps = self.connector.encoder_taps[i]
        if self.encoder_cfgs[i].tap_indexing == "blocks":
            return tuple(taps)
        return tuple(t - 1 for t in taps if t > 0)

    def _waveforms(self, i, audio):
        if audio is None:
            raise ConfigError(f"encoder {i} ({self.encoder_cfgs[i].kind}) computes its features from the waveforms, "
                              "but the batch holds only host log-mel features; set data.host_features=false")
        return audio

    def _w2v_bert_states(self, i, audio, features, audio_samples):
        enc, cfg = self.encoders[i], self.encoder_cfgs[i]
        pad = ALARM_EDGE_PAD if cfg.input_convention == "alarm" else 0   # ALARM: 160 zeros each side
        feats, mask = w2v_bert_features(self._waveforms(i, audio), audio_samples, edge_pad=pad)
        out = enc(feats.astype(enc.dtype), mask)
        return out.block_outputs if cfg.tap_indexing == "blocks" else out.hidden_states

    def _clap_states(self, i, audio, features, audio_samples):
        return [self.encoders[i](self._waveforms(i, audio), audio_samples)[:, None, :]]

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
        None), audio_samples `[N]` valid samples -> `[N, M, llm_dim]` where clip n's first
        `num_audio_tokens(audio_samples[n])` rows are its tokens. Host features serve every encoder, so
        they must fit each one's mel bins and padding."""
        states = []
        for i in range(len(self.connector.encoder_taps)):
            with jax.named_scope(f"encoder{i}"):      # scopes name the parts in profiles (op_name metadata)
                states.append(self.encoder_states(i, audio, features, audio_samples))
        with jax.named_scope("connector"):
            return self.connector(states, audio_samples)

    def num_audio_tokens(self, num_samples: int) -> int:
        return self.token_rule(num_samples)

    # ---- splicing and the LLM

    def caption_tokens(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """MATS text-only training: CLAP text tokens `[N, L]` (+ mask) of the clip slots' captions -> encoder 0's
        text embeddings (frozen: stop_gradient) -> the connector's text path -> `[N, M, llm_dim]`."""
        enc = self.encoders[0]
        if not hasattr(enc, "text_embeds") or not hasattr(self.connector, "from_text"):
            raise ConfigError(f"the batch holds caption tokens (text-only records) but encoder 0 "
                              f"({self.encoder_cfgs[0].kind}) has no text tower or connector "
                              f"{type(self.connector).kind!r} no text path; text-only training needs "
                              "model.connector.kind=mats with a CLAP encoder (model.encoders.0.kind=clap)")
        emb = jax.lax.stop_gradient(enc.text_embeds(ids, mask))
        return self.connector.from_text(emb)

    def embed_inputs(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Text embeddings with audio tokens written where `audio_clip >= 0` -> `[B, T, llm_dim]`. The audio
        comes from `batch["audio_features"]` (host log-mel) when present, else `batch["audio"]`; a slot whose
        row of `batch["caption_ids"]` holds tokens (MATS text-only records) takes `caption_tokens` instead."""
        text = self.llm.embed(batch["input_ids"])
        tokens = None
        if "audio_features" in batch:
            tokens = self.audio_tokens(None, batch["audio_samples"], features=batch["audio_features"])
        elif "audio" in batch:
            tokens = self.audio_tokens(batch["audio"], batch["audio_samples"])
        if "caption_ids" in batch:
            captions = self.caption_tokens(batch["caption_ids"], batch["caption_mask"])
            if tokens is None:
                tokens = captions
            else:
                has_text = batch["caption_mask"].astype(bool).any(axis=-1)
                tokens = jnp.where(has_text[:, None, None], captions.astype(tokens.dtype), tokens)
        if tokens is None:
            return text
        return splice_audio(text, tokens, batch["audio_clip"], batch["audio_pos"])

    def hidden(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The LLM's final normed hidden states `[B, T, llm_dim]` for a pipeline batch (the loss applies the
        head itself, block by block: `training/loss.py`)."""
        embeds = self.embed_inputs(batch)
        with jax.named_scope("llm"):
            return self.llm.hidden_states(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"))[0]

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Logits `[B, T, vocab]` float32 for a pipeline batch (see alm_jax/data/pipeline.py)."""
        return self.llm.logits(self.hidden(batch))


def match_embedding_scale(connector, llm: DecoderLM, kind: str) -> None:
    """Rescale the connector's output projection (in place) so that, for unit-variance inputs (it follows a
    LayerNorm), its outputs' RMS is the LLM's token-embedding RMS: kernel std = rms / sqrt(in_features),
    bias 0. A fresh connector's tokens are otherwise far larger than text embeddings (DeSTA's Q-Former on
    SmolLM2: 8x), which a short run learns to neutralise instead of reading."""
    proj = connector.output_projection()
    if proj is None:
        raise ConfigError(f"model.connector.output_init=embeddings needs a connector with one output projection; "
                          f"{kind!r} has none: use output_init: default")
    table = llm.embed_tokens.embedding[...].astype(jnp.float32)
    target = jnp.sqrt(jnp.mean(table * table))
    kernel = proj.kernel[...].astype(jnp.float32)
    std = jnp.sqrt(jnp.mean(kernel * kernel))
    scale = target / (std * jnp.sqrt(jnp.float32(proj.in_features)))
    proj.kernel.set_value((kernel * scale).astype(proj.kernel.dtype))
    if proj.bias is not None:
        proj.bias.set_value(jnp.zeros_like(proj.bias[...]))


def splice_audio(text: jax.Array, tokens: jax.Array, clip: jax.Array, pos: jax.Array) -> jax.Array:
    """text `[B, T, d]`, audio tokens `[B * C, M, d]`, row-local clip / token indices `[B, T]` (-1 = text)
    -> `[B, T, d]` with position (b, t) replaced by `tokens[b * C + clip, pos]` where `clip >= 0`."""
    b = text.shape[0]
    n_clips, per_clip = tokens.shape[0] // b, tokens.shape[1]
    row = jnp.arange(b, dtype=jnp.int32)[:, None]
    slot = jnp.where(clip >= 0, (row * n_clips + clip) * per_clip + pos, 0)       # into the flat token list
    picked = jnp.take(tokens.reshape(-1, tokens.shape[-1]).astype(text.dtype), slot, axis=0)
    return jnp.where((clip >= 0)[..., None], picked, text)


# ---- trainable / frozen filters

TRAINABLE = nnx.Any(nnx.All(nnx.Param, nnx.PathContains("connector")), nnx.LoRAParam)
"""Connector parameters and LoRA adapters. Everything else (encoders, LLM base weights) is frozen."""


RUNNING_STATE = nnx.Any(nnx.BatchStat, nnx.RngCount)
"""What a training forward updates besides the weights: BatchNorm running statistics and dropout RNG counters
(the keys stay fixed). The train step carries it, the checkpoint saves it (`model_state`)."""


def split_trainable(model: AudioLanguageModel):
    """`(graphdef, trainable_state, frozen_state)` for the train step."""
    return nnx.split(model, TRAINABLE, ...)


# ---- generation

def generate(model: AudioLanguageModel, batch: dict[str, jax.Array], *, max_new_tokens: int = 64,
             eos_id: int | None = None) -> jax.Array:
    """Greedy answers `[B, max_new_tokens]` int32 for a left-padded prompt batch (input_ids, attention_mask,
    audio_clip, audio_pos, audio or audio_features, audio_samples; see `alm_jax.data.pipeline.collate_prompts`): the
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


# EncoderConfig.kind -> (model, i, audio, features, audio_samples) -> encoder i's state list
ENCODER_STATES = {"whisper": AudioLanguageModel._whisper_states, "w2v_bert": AudioLanguageModel._w2v_bert_states,
                  "clap": AudioLanguageModel._clap_states}
