"""The Whisper audio encoder in Flax NNX (frozen feature extractor of DeSTA / ALARM-style ALMs).

conv1 (k3, pad 1) + GELU -> conv2 (k3, stride 2, pad 1) + GELU -> + positions -> pre-LN blocks
(bidirectional self-attention, GELU MLP) -> final LayerNorm. Input `[batch, n_mels, frames]` log-mel
(`alm_jax.audio.log_mel`); output `[batch, ceil(frames / 2), d_model]`.

Input length: the padded 30 s window (3000 frames -> 1500 positions, as HF requires; DeSTA) or a trimmed
shorter input, whose positions are the first `ceil(frames / 2)` rows of the table (ALARM).

Two indexings of the per-layer states are returned (see `WhisperEncoderOutput`):
- `hidden_states` (HF `output_hidden_states=True`): L + 1 entries; [0] = embeddings (conv stem + positions),
  [i] = output of block i (1-based) for i < L, and [L] = the final-LayerNorm output (= `last_hidden_state`;
  transformers replaces the last block's raw output by it). ALARM indexes this tuple.
- `block_outputs`: L entries; [i] = raw output of block i (0-based), before any final LayerNorm. DeSTA taps
  these (e.g. [7, 15, 23, 31] of large-v3). They coincide with `hidden_states[i + 1]` for i < L - 1; the last
  one differs (no final LayerNorm).

Blocks (`models/stack.py`): scanned by default (one `WhisperBlock` with parameters `[L, ...]`, one `lax.scan`)
or unrolled. Either way the block outputs are written into one buffer carried through the layers; with
`keep` (the blocks a connector taps) only those are kept and only blocks up to the deepest one run (the
other entries are None), which is what the unrolled program got from XLA's dead-code elimination.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alm_jax.errors import AudioError, ConfigError
from alm_jax.models.layers import Conv1d, LayerNorm, Linear, param
from alm_jax.models.stack import make_stack, run_stack
from alm_jax.sharding import ACTIVATION_AXES, constrain

_GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder half of an HF `WhisperConfig`."""
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"whisper: d_model={self.d_model} is not divisible by "
                              f"encoder_attention_heads={self.encoder_attention_heads}")
        if self.activation_function not in _GELU_APPROXIMATE:
            raise ConfigError(f"whisper: activation_function={self.activation_function!r} is not supported; "
                              f"use one of {sorted(_GELU_APPROXIMATE)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_frames(self) -> int:
        """Longest mel input the position table allows (3000 = 30 s for real checkpoints)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "WhisperEncoderConfig":
        """From an HF Whisper `config.json` dict (missing optional keys take HF's defaults)."""
        required = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                    "max_source_positions")
        missing = [k for k in required if k not in config]
        if missing:
            raise ConfigError(f"whisper config lacks {missing} (model_type={config.get('model_type')!r}); "
                              "pass the config.json of a Hugging Face Whisper checkpoint")
        return cls(**{k: int(config[k]) for k in required},
                   activation_function=str(config.get("activation_function", "gelu")))


@struct.dataclass
class WhisperEncoderOutput:
    """`last_hidden_state` `[batch, positions, d]`; `hidden_states` (HF indexing, L + 1 entries) and
    `block_outputs` (raw block outputs, L entries), each entry `[batch, positions, d]`; see the module doc.
    Entries not asked for (`keep`) are None, and so is `last_hidden_state` when the last block did not run."""
    last_hidden_state: jax.Array | None
    hidden_states: tuple[jax.Array | None, ...]
    block_outputs: tuple[jax.Array | None, ...]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position table `[length, channels]`: sin in the first half, cos in the second."""
    if channels % 2:
        raise ConfigError(f"whisper: sinusoidal positions need an even d_model, got {channels}")
    inv = np.exp(-math.log(max_timescale) / (channels // 2 - 1) * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class WhisperAttention(nnx.Module):
    """Bidirectional multi-head self-attention; q/v/out have biases, k has none (as in Whisper)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, kw = cfg.d_model, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.q_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=True, **kw)
        self.k_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=False, **kw)
        self.v_proj = Linear(d, d, axes=("audio_embed", "audio_heads"), use_bias=True, **kw)
        self.out_proj = Linear(d, d, axes=("audio_heads", "audio_embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x `[batch, time, d]` -> `[batch, time, d]`; softmax in float32. `key_mask` `[batch, time]` bool
        (True = attend; None = every position)."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        q = split(self.q_proj(x) * (self.head_dim ** -0.5))  # scaled before the product, as HF does
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        o = chunked_attention(q, k, v, key_mask=key_mask)  # [batch, time, heads, head_dim]
        return self.out_proj(o.reshape(b, t, self.heads * self.head_dim))


QUERY_CHUNK = 150  # 1500 encoder positions = 10 chunks


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = QUERY_CHUNK,
                      key_mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T) v, one block of `chunk` queries at a time (`lax.map`), softmax in float32; keys where
    `key_mask` `[batch, time]` is False are left out (None: all keys).

    q, k, v `[batch, time, heads, head_dim]` (q already scaled) -> `[batch, time, heads, head_dim]`. Never
    materializing the full `[time, time]` scores keeps them in cache: on CPU, 1500 Whisper positions ran
    2x faster than `jax.nn.dot_product_attention` (75 vs 147 ms per layer, batch 2, 6 heads) with equal
    results."""
    b, t, h, d = q.shape
    # heads-major once, outside the loop: transposing k and v inside each block cost XLA:CPU a copy per block
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [batch, heads, time, head_dim]

    def block(qc):                                                      # [batch, heads, chunk, head_dim]
        scores = jnp.einsum("bhqd,bhkd->bhqk", qc, kh).astype(jnp.float32)
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, vh)

    qh = q.transpose(0, 2, 1, 3)
    if t <= chunk:
        return block(qh).transpose(0, 2, 1, 3)
    n = -(-t // chunk)
    blocks = jnp.pad(qh, ((0, 0), (0, 0), (0, n * chunk - t), (0, 0))).reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(block, blocks)                                    # [n, batch, heads, chunk, head_dim]
    return out.transpose(1, 0, 3, 2, 4).reshape(b, n * chunk, h, d)[:, :t]


class WhisperBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, cfg: WhisperEncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.encoder_ffn_dim
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gelu_approximate = _GELU_APPROXIMATE[cfg.activation_function]
        self.attn_norm = LayerNorm(d, **ln)
        self.attn = WhisperAttention(cfg, **kw)
        self.mlp_norm = LayerNorm(d, **ln)
        self.fc1 = Linear(d, f, axes=("audio_embed", "audio_mlp"), use_bias=True, **kw)
        self.fc2 = Linear(f, d, axes=("audio_mlp", "audio_embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x `[batch, time, d]` -> `[batch, time, d]`."""
        x = x + self.attn(self.attn_norm(x), key_mask)
        h = jax.nn.gelu(self.fc1(self.mlp_norm(x)), approximate=self.gelu_approximate)
        return x + self.fc2(h)


class WhisperEncoder(nnx.Module):
    """Whisper encoder. `encoder(input_features [batch, n_mels, frames])` -> `WhisperEncoderOutput`."""

    def __init__(self, cfg: WhisperEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, scan_layers: bool = True):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = cfg, dtype
        d = cfg.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gelu_approximate = _GELU_APPROXIMATE[cfg.activation_function]
        self.conv1 = Conv1d(cfg.num_mel_bins, d, 3, stride=1, padding=1, axes=("mel", "audio_embed"), **kw)
        # conv2 maps embed -> embed; one of the two channel axes must stay unsharded.
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, axes=("audio_embed", None), **kw)
        self.embed_positions = param(jnp.asarray(sinusoids(cfg.max_source_positions, d), param_dtype),
                                     ("audio_pos", "audio_embed"))
        self.layers = make_stack(lambda r: WhisperBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                 cfg.encoder_layers, scan=scan_layers, rngs=rngs)
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def embed(self, input_features: jax.Array) -> jax.Array:
        """input_features `[batch, n_mels, frames]` -> embeddings `[batch, ceil(frames / 2), d]`."""
        cfg = self.config
        if input_features.ndim != 3 or input_features.shape[1] != cfg.num_mel_bins:
            raise AudioError(f"whisper encoder expects input_features [batch, {cfg.num_mel_bins}, frames], got "
                             f"{input_features.shape}; compute them with alm_jax.audio.log_mel(n_mels="
                             f"{cfg.num_mel_bins})")
        frames = input_features.shape[2]
        if frames > cfg.max_frames:
            raise AudioError(f"whisper encoder input has {frames} mel frames but its {cfg.max_source_positions} "
                             f"positions allow at most {cfg.max_frames} ({cfg.max_frames // 100} s); "
                             "split or truncate the audio")
        x = jnp.swapaxes(input_features, 1, 2)  # [batch, frames, n_mels]
        x = jax.nn.gelu(self.conv1(x), approximate=self.gelu_approximate)
        x = jax.nn.gelu(self.conv2(x), approximate=self.gelu_approximate)
        pos = self.embed_positions[: x.shape[1]].astype(self.dtype)
        return x + pos[None]

    def __call__(self, input_features: jax.Array, valid_positions: jax.Array | None = None, *,
                 keep: Sequence[int] | None = None) -> WhisperEncoderOutput:
        """input_features `[batch, n_mels, frames]` (frames <= 2 * max_source_positions) -> outputs with
        `[batch, ceil(frames / 2), d]` states. `valid_positions` `[batch]`: self-attention sees only the first
        that many positions of each row as keys (Qwen2-Audio's padding mask); None = all (Whisper, DeSTA).
        `keep`: the blocks (0-based) whose outputs are wanted; blocks past the deepest one do not run, and
        the entries of other blocks are None (hidden_states[0], the embeddings, is always there). None = all."""
        n_layers = self.config.encoder_layers
        kept = tuple(range(n_layers)) if keep is None else tuple(sorted(set(keep)))
        if any(not 0 <= k < n_layers for k in kept):
            raise ConfigError(f"whisper encoder: keep={tuple(keep)} names blocks outside 0..{n_layers - 1}")
        x = self.embed(input_features)
        key_mask = None if valid_positions is None else jnp.arange(x.shape[1])[None, :] < valid_positions[:, None]
        run = kept[-1] + 1 if kept else 0
        slots = np.full(run, len(kept), np.int32)   # block -> its row in the buffer (the last row: discarded)
        slots[list(kept)] = np.arange(len(kept))

        def body(block, carry, slot):
            h, buffer = carry
            h = constrain(block(h, key_mask), ACTIVATION_AXES)
            return (h, jax.lax.dynamic_update_index_in_dim(buffer, h, slot, 0)), None

        x = constrain(x, ACTIVATION_AXES)
        buffer = constrain(jnp.zeros((len(kept) + 1, *x.shape), x.dtype), (None, *ACTIVATION_AXES))
        (last_block, buffer), _ = run_stack(self.layers, body, (x, buffer), jnp.asarray(slots), length=run)
        blocks = tuple(buffer[int(slots[i])] if i in kept else None for i in range(n_layers))
        last = self.layer_norm(last_block) if run == n_layers else None
        return WhisperEncoderOutput(last_hidden_state=last, hidden_states=(x, *blocks[:-1], last),
                                    block_outputs=blocks)
