"""The Whisper text decoder in Flax NNX, with a KV cache and greedy transcription (timestamps off).

DeSTA's inference path writes the transcript of a clip with the same frozen Whisper whose encoder feeds the
connector; this module is that decoder. Parameter names mirror HF `WhisperDecoder` (`embed_tokens`,
`embed_positions`, `layers.{i}.self_attn`, `self_attn_layer_norm`, `encoder_attn`, `encoder_attn_layer_norm`,
`fc1`, `fc2`, `final_layer_norm`, `layer_norm`; `proj_out` only when the head is not tied).

    tokens [b, t] -> embed_tokens + embed_positions[pos] -> pre-LN blocks (causal self-attention,
      cross-attention to the encoder output [b, s, d], GELU MLP) -> layer_norm -> logits [b, t, vocab]

`WhisperDecoderCache` holds per layer the self-attention keys/values `[b, max_len, heads, head_dim]`
(written as tokens arrive) and the cross-attention keys/values `[b, s, heads, head_dim]`, computed once from
the encoder output (`init_cache`). `transcribe` follows transformers'
`WhisperForConditionalGeneration.generate` for short-form, timestamps-off, greedy decoding: the prompt
`<|startoftranscript|>` [+ language/task] + `<|notimestamps|>`, `suppress_tokens` at every step,
`begin_suppress_tokens` at the first generated step, stop at EOS (later slots hold the pad id).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.layers import Embed, LayerNorm, Linear, param
from alm_jax.models.whisper import _GELU_APPROXIMATE, WhisperEncoder


@dataclasses.dataclass(frozen=True)
class WhisperDecoderConfig:
    """The decoder half of an HF `WhisperConfig` (tiny.en: 4 layers, d 384, 6 heads, vocab 51864)."""
    vocab_size: int = 51864
    d_model: int = 384
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.decoder_attention_heads:
            raise ConfigError(f"whisper decoder: d_model={self.d_model} is not divisible by "
                              f"decoder_attention_heads={self.decoder_attention_heads}")
        if self.activation_function not in _GELU_APPROXIMATE:
            raise ConfigError(f"whisper decoder: activation_function={self.activation_function!r} is not "
                              f"supported; use one of {sorted(_GELU_APPROXIMATE)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "WhisperDecoderConfig":
        """From an HF Whisper `config.json` dict (missing optional keys take HF's defaults)."""
        required = ("vocab_size", "d_model", "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim",
                    "max_target_positions")
        missing = [k for k in required if k not in config]
        if missing:
            raise ConfigError(f"whisper config lacks {missing} (model_type={config.get('model_type')!r}); "
                              "pass the config.json of a Hugging Face Whisper checkpoint with its decoder")
        return cls(**{k: int(config[k]) for k in required},
                   activation_function=str(config.get("activation_function", "gelu")),
                   scale_embedding=bool(config.get("scale_embedding", False)),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))


@dataclasses.dataclass(frozen=True)
class WhisperGenerationConfig:
    """What greedy short-form transcription needs from `generation_config.json` (tiny.en values).

    `prompt` is the forced decoder prefix (`<|startoftranscript|>`, for multilingual models also the
    language and task tokens, then `<|notimestamps|>`); `suppress_tokens` are masked at every step,
    `begin_suppress_tokens` at the first generated step only (HF `SuppressTokens[AtBegin]LogitsProcessor`)."""
    prompt: tuple[int, ...] = (50257, 50362)
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = (220, 50256)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WhisperDecoderCache:
    """Decoder state for incremental decoding (a pytree).

    self_keys/self_values: per layer `[batch, max_len, heads, head_dim]`, slots `< end` hold the tokens seen so
    far; cross_keys/cross_values: per layer `[batch, source, heads, head_dim]` from the encoder output; end:
    int32 scalar, the next slot (= the position of the next token; all rows share it)."""
    self_keys: tuple[jax.Array, ...]
    self_values: tuple[jax.Array, ...]
    cross_keys: tuple[jax.Array, ...]
    cross_values: tuple[jax.Array, ...]
    end: jax.Array


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q `[b, t, h, d]` (already scaled), k/v `[b, s, h, d]`, mask `[t, s]` bool or None -> `[b, t, h, d]`;
    scores and softmax in float32."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class WhisperDecoderAttention(nnx.Module):
    """Multi-head attention of the decoder (self or cross); q/v/out have biases, k has none (HF)."""

    def __init__(self, cfg: WhisperDecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, kw = cfg.d_model, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = cfg.decoder_attention_heads, cfg.head_dim
        self.q_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=True, **kw)
        self.k_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=False, **kw)
        self.v_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=True, **kw)
        self.out_proj = Linear(d, d, axes=("audio_heads", "audio_embed"), use_bias=True, **kw)

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(*y.shape[:2], self.heads, self.head_dim)

    def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x `[b, s, d]` -> keys, values `[b, s, heads, head_dim]`."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x `[b, t, d]` queries over keys/values `[b, s, heads, head_dim]`, mask `[t, s]` -> `[b, t, d]`."""
        b, t, _ = x.shape
        q = self._split(self.q_proj(x) * (self.head_dim ** -0.5))  # scaled before the product, as HF does
        o = _attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.out_proj(o.reshape(b, t, self.heads * self.head_dim))


class WhisperDecoderLayer(nnx.Module):
    """Pre-LN block: x + self_attn(LN x) [causal], x + encoder_attn(LN x, encoder), x + fc2(gelu(fc1(LN x)))."""

    def __init__(self, cfg: WhisperDecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.decoder_ffn_dim
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gelu_approximate = _GELU_APPROXIMATE[cfg.activation_function]
        self.self_attn = WhisperDecoderAttention(cfg, **kw)
        self.self_attn_layer_norm = LayerNorm(d, **ln)
        self.encoder_attn = WhisperDecoderAttention(cfg, **kw)
        self.encoder_attn_layer_norm = LayerNorm(d, **ln)
        self.fc1 = Linear(d, f, axes=("audio_embed", "audio_mlp"), use_bias=True, **kw)
        self.fc2 = Linear(f, d, axes=("audio_mlp", "audio_embed"), use_bias=True, **kw)
        self.final_layer_norm = LayerNorm(d, **ln)

    def __call__(self, x: jax.Array, self_kv: tuple[jax.Array, jax.Array], cross_kv: tuple[jax.Array, jax.Array],
                 mask: jax.Array, write_at: jax.Array | None):
        """x `[b, t, d]`; self_kv: the cache's `[b, max_len, h, hd]` buffers (written at slot `write_at`) or,
        with write_at None, unused (this call's own keys are attended); cross_kv `[b, s, h, hd]`; mask
        `[t, keys]` causal. Returns (`[b, t, d]`, updated self (k, v))."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.keys_values(h)
        if write_at is not None:
            start = (0, write_at, 0, 0)
            k = jax.lax.dynamic_update_slice(self_kv[0], k.astype(self_kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(self_kv[1], v.astype(self_kv[1].dtype), start)
        x = x + self.self_attn(h, k, v, mask)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), *cross_kv, None)
        y = jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=self.gelu_approximate)
        return x + self.fc2(y), (k, v)


class WhisperDecoder(nnx.Module):
    """Whisper decoder + LM head (tied to `embed_tokens` unless the config unties it).

    `decoder(tokens [b, t], encoder_hidden=[b, s, d])` -> logits `[b, t, vocab]` float32 (no cache), or
    `decoder(tokens, cache=...)` -> (logits, cache) for incremental decoding (`init_cache` first)."""

    def __init__(self, cfg: WhisperDecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = cfg, dtype
        d = cfg.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, d, axes=("vocab", "audio_embed"), **kw)
        self.embed_positions = param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.max_target_positions, d),
                                                                   param_dtype), ("audio_pos", "audio_embed"))
        self.layers = nnx.List([WhisperDecoderLayer(cfg, **kw) for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.proj_out = (None if cfg.tie_word_embeddings else
                         Linear(d, cfg.vocab_size, axes=("audio_embed", "vocab"), use_bias=False, **kw))

    def cross_keys_values(self, encoder_hidden: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """encoder_hidden `[b, s, d]` -> per layer (keys, values) `[b, s, heads, head_dim]`."""
        enc = encoder_hidden.astype(self.dtype)
        return tuple(layer.encoder_attn.keys_values(enc) for layer in self.layers)

    def init_cache(self, encoder_hidden: jax.Array, max_len: int) -> WhisperDecoderCache:
        """An empty self-attention cache of `max_len` slots and the cross keys/values of encoder_hidden
        `[b, s, d]` (computed here, once)."""
        if max_len > self.config.max_target_positions:
            raise ConfigError(f"whisper decoder: a cache of {max_len} tokens exceeds max_target_positions="
                              f"{self.config.max_target_positions}; decode fewer new tokens")
        b, cfg = encoder_hidden.shape[0], self.config
        shape = (b, max_len, cfg.decoder_attention_heads, cfg.head_dim)
        cross = self.cross_keys_values(encoder_hidden)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in self.layers)
        return WhisperDecoderCache(self_keys=zeros, self_values=zeros, cross_keys=tuple(k for k, _ in cross),
                                   cross_values=tuple(v for _, v in cross), end=jnp.zeros((), jnp.int32))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states `[b, t, d]` -> logits `[b, t, vocab]` float32."""
        out = self.embed_tokens.attend(h) if self.proj_out is None else self.proj_out(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, encoder_hidden: jax.Array | None = None,
                 cache: WhisperDecoderCache | None = None):
        """tokens `[b, t]` int. Without cache: encoder_hidden `[b, s, d]` is required, positions are 0..t-1,
        returns logits `[b, t, vocab]`. With cache: the tokens take positions end..end+t-1, returns
        (logits, advanced cache)."""
        cfg = self.config
        t = tokens.shape[1]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        pos = jax.lax.dynamic_slice_in_dim(self.embed_positions[...], start, t, axis=0).astype(self.dtype)
        x = self.embed_tokens(tokens)
        if cfg.scale_embedding:
            x = x * jnp.asarray(cfg.d_model ** 0.5, self.dtype)
        x = x + pos[None]
        if cache is None:
            if encoder_hidden is None:
                raise ConfigError("whisper decoder: pass encoder_hidden [batch, source, d] or a cache from init_cache")
            cross = self.cross_keys_values(encoder_hidden)
            mask = jnp.tril(jnp.ones((t, t), bool))
            for layer, ckv in zip(self.layers, cross):
                x, _ = layer(x, (None, None), ckv, mask, None)
            return self.logits(self.layer_norm(x))
        max_len = cache.self_keys[0].shape[1]
        mask = jnp.arange(max_len)[None, :] <= (start + jnp.arange(t))[:, None]   # [t, max_len]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, (cache.self_keys[i], cache.self_values[i]),
                              (cache.cross_keys[i], cache.cross_values[i]), mask, start)
            keys.append(k)
            values.append(v)
        cache = dataclasses.replace(cache, self_keys=tuple(keys), self_values=tuple(values), end=start + t)
        return self.logits(self.layer_norm(x)), cache


def _suppress(logits: jax.Array, tokens: Sequence[int]) -> jax.Array:
    """logits `[b, vocab]` with `tokens` set to -inf (HF SuppressTokensLogitsProcessor)."""
    if not tokens:
        return logits
    ids = jnp.asarray([t for t in tokens if 0 <= t < logits.shape[-1]], jnp.int32)
    return logits.at[:, ids].set(-jnp.inf)


def greedy_transcribe(decoder: WhisperDecoder, encoder_hidden: jax.Array, gen: WhisperGenerationConfig, *,
                      max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Traceable greedy decoding from encoder output `[b, s, d]`: prefill `gen.prompt`, then one token per
    `lax.while_loop` step until every row emitted EOS or `max_new_tokens` tokens were produced.
    Returns (tokens `[b, max_new_tokens]` int32: the generated tokens, EOS included, then `pad_token_id`;
    lengths `[b]` int32: the transcript tokens per row, i.e. those before EOS). HF `generate` returns the
    same rows with EOS replaced by padding (identical when pad = EOS, as in every Whisper checkpoint)."""
    b = encoder_hidden.shape[0]
    prompt = jnp.broadcast_to(jnp.asarray(gen.prompt, jnp.int32), (b, len(gen.prompt)))
    cache = decoder.init_cache(encoder_hidden, len(gen.prompt) + max_new_tokens)
    logits, cache = decoder(prompt, cache=cache)
    first = _suppress(_suppress(logits[:, -1], gen.suppress_tokens), gen.begin_suppress_tokens)
    token = jnp.argmax(first, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), gen.pad_token_id, jnp.int32).at[:, 0].set(token)
    done = token == gen.eos_token_id
    lengths = (~done).astype(jnp.int32)

    def unfinished(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        step, token, cache, out, done, lengths = carry
        logits, cache = decoder(token[:, None], cache=cache)
        nxt = jnp.argmax(_suppress(logits[:, 0], gen.suppress_tokens), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, gen.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        done = done | (nxt == gen.eos_token_id)
        return step + 1, nxt, cache, out, done, lengths + (~done).astype(jnp.int32)

    carry = (jnp.int32(1), token, cache, out, done, lengths)
    _, _, _, out, _, lengths = jax.lax.while_loop(unfinished, decode_one, carry)
    return out, lengths


def transcribe(encoder: WhisperEncoder, decoder: WhisperDecoder, features: jax.Array,
               gen: WhisperGenerationConfig = WhisperGenerationConfig(), *,
               max_new_tokens: int = 128) -> tuple[jax.Array, jax.Array]:
    """Greedy transcription (jitted): log-mel `features` `[b, n_mels, 3000]` (the padded 30 s window,
    `alm_jax.audio.log_mel`) -> (tokens `[b, max_new_tokens]` int32, lengths `[b]`; see `greedy_transcribe`).
    Token-for-token equal to HF `generate(input_features)` minus its prompt, timestamps off (one 30 s segment:
    should the model emit two timestamp tokens (ids above `<|notimestamps|>`) in a row, HF would cut the segment
    there and decode on; this loop does not). DeSTA writes
    at most 128 new tokens and uses " " for clips without speech (gate with `alm_jax.audio.vad`)."""
    limit = decoder.config.max_target_positions - len(gen.prompt)
    if max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens={max_new_tokens} + the {len(gen.prompt)}-token prompt exceed the "
                          f"decoder's {decoder.config.max_target_positions} positions; use at most {limit}")
    graphdef, state = nnx.split((encoder, decoder))
    return _transcribe(graphdef, state, features, gen=gen, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("gen", "max_new_tokens"))
def _transcribe(graphdef, state, features, *, gen, max_new_tokens):
    encoder, decoder = nnx.merge(graphdef, state)
    hidden = encoder(features.astype(encoder.dtype)).last_hidden_state
    return greedy_transcribe(decoder, hidden, gen, max_new_tokens=max_new_tokens)
