"""ALARM per-encoder adapters: softmax layer average, then a conv downsampler to half the frame rate
(`AlarmAdapter`), a 2-layer MLP (`MLPAdapter`, for 25 Hz encoders such as MuQ) or nothing
(`IdentityAdapter`, the Perceiver inputs of ALARM-P), then an optional projection to the LLM width.

Reference: ALARM `adapter_implementations/{base,downsampler_conformer,mlp,identity}.py` with
`use_conformer: false`, `downsampler_depth: 1`, `pre_average: true`, `trim_extra_padding: true`.

Trimming. ALARM cuts the encoder states of a batch to its longest clip (`trim_padding_in_encoded_layers`)
before the adapter; the conv adapter then pads an odd length with one zero frame. With static shapes the
adapters take `frames [batch]` (each clip's valid encoder frames) and `clips [batch]` (True = a real clip, not
an empty slot) and compute exactly what ALARM computes on the cut tensor: with L = the longest real clip's
frames and L2 = L rounded up to even, positions >= L enter the convs as zeros, BatchNorm statistics count
the real clips' positions < L2 (< L2 / 2 after the stride-2 conv; a shorter clip's padding inside that range
counts, as in ALARM), and outputs at positions >= L2 / 2 (>= L for the MLP and identity adapters) are zero,
as ALARM's `AudioFusion.pad_outputs` pads them. Without `frames` the whole buffer is one clip length.
A clip's tokens are `output_lengths(frames)` = frames // 2 (conv) or frames (MLP, identity), ALARM's
`calc_length`.

Frozen adapters (staged training): `freeze_statistics(module)` makes every adapter BatchNorm under `module`
normalize with its running statistics and stop updating them, whatever `model.train()` / `model.eval()` say.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.errors import ConfigError
from alm_jax.models.connectors.common import BatchNorm1d, LayerSoftmaxAverage, check_last_dim, gelu, select_taps
from alm_jax.models.layers import Conv1d, LayerNorm, Linear


def batch_frames(frames: jax.Array, clips: jax.Array | None, limit: int) -> jax.Array:
    """The frames ALARM trims a batch to: the longest real clip's (`clips` True; all when None), at most
    `limit` (the static buffer). frames `[batch]` -> int32 scalar."""
    f = frames if clips is None else jnp.where(clips, frames, 0)
    return jnp.minimum(jnp.max(f), limit).astype(jnp.int32)


def _time_mask(length, t: int) -> jax.Array:
    """`[1, t, 1]` True where the position < length (a traced or static int)."""
    return (jnp.arange(t) < length)[None, :, None]


class MaskedBatchNorm1d(BatchNorm1d):
    """`BatchNorm1d` whose training statistics count only the positions `mask [batch, time]` marks (ALARM's
    trimmed batch), and which a frozen adapter runs on its running statistics: `frozen=True` (set by
    `freeze_statistics`) normalizes with them and leaves them unchanged, in training too."""

    def __init__(self, dim: int, **kw):
        super().__init__(dim, **kw)
        self.frozen = False

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 use_running_average: bool | None = None) -> jax.Array:
        return super().__call__(x, mask, use_running_average=True if self.frozen else use_running_average)


def freeze_statistics(module: nnx.Module, frozen: bool = True) -> int:
    """Marks every adapter BatchNorm under `module` (itself included) frozen (running statistics, never
    updated; `frozen=False` undoes it). A static attribute: set it before `nnx.split` (the train step's graphdef
    carries it). Returns how many were marked (0: nothing under `module` has batch statistics)."""
    count = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, MaskedBatchNorm1d):
            node.frozen = frozen
            count += 1
    return count


@dataclasses.dataclass(frozen=True)
class AlarmAdapterConfig:
    """Defaults: ALARM's Whisper-large-v3 adapter (`whisper_batch.yaml`) for Qwen3-4B (2560).

    `layers` index HF-style `hidden_states` (0 = embeddings), as ALARM does."""

    layers: tuple[int, ...] = (7, 15, 23, 31)
    enc_dim: int = 1280
    hidden: int = 1024            # adapter_embedding_dim
    conv_dim: int = 2048          # width after the first conv (2 * hidden in ALARM)
    llm_dim: int = 2560
    norm: Literal["batch", "layer"] = "batch"   # Whisper: batch; W2V-BERT / SSLAM: layer
    norm_eps: float = 1e-5
    bn_momentum: float = 0.1      # torch convention: running = (1 - m) * running + m * batch


class AlarmAdapter(nnx.Module):
    """Layer average -> Linear(enc -> hidden) -> pad time to even -> Conv1d(hidden -> conv_dim, k3, s1, p1)
    -> GELU -> Norm -> Conv1d(conv_dim -> hidden, k4, s2, p1) -> GELU -> Norm -> Linear(hidden -> llm_dim).

    hidden_states: list of `[batch, frames, enc_dim]` (+ `frames [batch]`, `clips [batch]`: the trimming of the
    module docstring) -> `[batch, ceil(frames / 2), llm_dim]`; clip n's tokens are its first `frames[n] // 2`.
    The input Linear is omitted when `enc_dim == hidden` (ALARM uses Identity then). Norm "layer" is a
    LayerNorm over channels; "batch" is `MaskedBatchNorm1d` (batch statistics + running-average update while
    training, running statistics under `model.eval()` / `use_running_average=True` or when frozen).
    """

    downsample = 2

    def __init__(self, cfg: AlarmAdapterConfig = AlarmAdapterConfig(), *, use_running_average: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.norm not in ("batch", "layer"):
            raise ConfigError(f"AlarmAdapterConfig.norm={cfg.norm!r}: use 'batch' or 'layer'")
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_average = LayerSoftmaxAverage(len(cfg.layers), **kw)
        self.input_proj = (Linear(cfg.enc_dim, cfg.hidden, axes=("conn_embed", "conn_embed"), use_bias=True,
                                  rngs=rngs, **kw) if cfg.enc_dim != cfg.hidden else None)
        self.conv1 = Conv1d(cfg.hidden, cfg.conv_dim, 3, stride=1, padding=1, axes=("conn_embed", "conn_mlp"),
                            rngs=rngs, **kw)
        self.conv2 = Conv1d(cfg.conv_dim, cfg.hidden, 4, stride=2, padding=1, axes=("conn_mlp", "conn_embed"),
                            rngs=rngs, **kw)
        self.norm1 = self._norm(cfg.conv_dim, "conn_mlp", use_running_average, kw)
        self.norm2 = self._norm(cfg.hidden, "conn_embed", use_running_average, kw)
        self.llm_proj = Linear(cfg.hidden, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                               rngs=rngs, **kw)

    def _norm(self, dim, axis_name, use_running_average, kw):
        if self.cfg.norm == "batch":
            return MaskedBatchNorm1d(dim, momentum=self.cfg.bn_momentum, eps=self.cfg.norm_eps, axis_name=axis_name,
                                     use_running_average=use_running_average, **kw)
        return LayerNorm(dim, axis_name=axis_name, eps=self.cfg.norm_eps, **kw)

    def _apply_norm(self, norm, x, stats_mask):
        return norm(x, stats_mask) if isinstance(norm, MaskedBatchNorm1d) else norm(x)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array, frames: jax.Array | None = None,
                 clips: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        layers = select_taps(hidden_states, cfg.layers, "AlarmAdapter")
        check_last_dim(layers[0], cfg.enc_dim, "AlarmAdapter")
        x = self.layer_average(layers)
        if self.input_proj is not None:
            x = self.input_proj(x)
        b, f = x.shape[:2]
        if f % 2:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        t = x.shape[1]
        length = f if frames is None else batch_frames(frames, clips, f)   # ALARM's cut
        even = length + length % 2
        trim = frames is not None or clips is not None
        real = jnp.ones((b,), bool) if clips is None else clips.astype(bool)
        if trim:
            x = jnp.where(_time_mask(length, t), x, 0)
        keep1, keep2 = _time_mask(even, t), _time_mask(even // 2, t // 2)
        h = self._apply_norm(self.norm1, gelu(self.conv1(x)), real[:, None] & keep1[..., 0] if trim else None)
        if trim:
            h = jnp.where(keep1, h, 0)
        y = self._apply_norm(self.norm2, gelu(self.conv2(h)), real[:, None] & keep2[..., 0] if trim else None)
        out = self.llm_proj(y)
        return jnp.where(keep2, out, 0) if trim else out

    @staticmethod
    def output_lengths(frames: jax.Array | int) -> jax.Array | int:
        """Tokens of a clip with `frames` valid encoder frames: frames // 2 (ALARM's `calc_length`; an odd
        clip's last frame only enters its last token's neighbourhood)."""
        return frames // 2


@dataclasses.dataclass(frozen=True)
class MLPAdapterConfig:
    """Defaults: ALARM's MuQ adapter (25 Hz native, 1024 wide)."""

    layers: tuple[int, ...] = (4, 8, 12)
    enc_dim: int = 1024
    hidden: int = 1024
    llm_dim: int = 2560


class MLPAdapter(nnx.Module):
    """Layer average -> Linear(enc -> hidden) -> GELU -> Linear(hidden -> hidden) -> GELU -> Linear(hidden ->
    llm_dim) (ALARM's MLP ends in a GELU before its `llm_proj`). `[batch, frames, enc_dim]` list (+ `frames`,
    `clips`: outputs past the batch's longest clip are zero) -> `[batch, frames, llm_dim]`; the frame rate is
    unchanged."""

    downsample = 1

    def __init__(self, cfg: MLPAdapterConfig = MLPAdapterConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_average = LayerSoftmaxAverage(len(cfg.layers), **kw)
        self.fc1 = Linear(cfg.enc_dim, cfg.hidden, axes=("conn_embed", "conn_mlp"), use_bias=True, rngs=rngs, **kw)
        self.fc2 = Linear(cfg.hidden, cfg.hidden, axes=("conn_mlp", "conn_embed"), use_bias=True, rngs=rngs, **kw)
        self.llm_proj = Linear(cfg.hidden, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                               rngs=rngs, **kw)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array, frames: jax.Array | None = None,
                 clips: jax.Array | None = None) -> jax.Array:
        layers = select_taps(hidden_states, self.cfg.layers, "MLPAdapter")
        check_last_dim(layers[0], self.cfg.enc_dim, "MLPAdapter")
        x = self.layer_average(layers)
        out = self.llm_proj(gelu(self.fc2(gelu(self.fc1(x)))))
        return _trim(out, frames, clips)

    @staticmethod
    def output_lengths(frames):
        return frames


@dataclasses.dataclass(frozen=True)
class IdentityAdapterConfig:
    """Defaults: ALARM-P's W2V-BERT input (raw layer-averaged features, no projection)."""

    layers: tuple[int, ...] = (6, 10, 15, 20, 24)
    enc_dim: int = 1024
    llm_dim: int | None = None   # None: no projection (ALARM `use_llm_proj: false`)


class IdentityAdapter(nnx.Module):
    """Layer average, then optionally Linear(enc -> llm_dim). `[batch, frames, enc_dim]` list (+ `frames`,
    `clips` as `MLPAdapter`) -> `[batch, frames, llm_dim or enc_dim]`."""

    downsample = 1

    def __init__(self, cfg: IdentityAdapterConfig = IdentityAdapterConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_average = LayerSoftmaxAverage(len(cfg.layers), dtype=dtype, param_dtype=param_dtype)
        self.llm_proj = (Linear(cfg.enc_dim, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs) if cfg.llm_dim else None)

    @property
    def out_dim(self) -> int:
        return self.cfg.llm_dim or self.cfg.enc_dim

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array, frames: jax.Array | None = None,
                 clips: jax.Array | None = None) -> jax.Array:
        layers = select_taps(hidden_states, self.cfg.layers, "IdentityAdapter")
        check_last_dim(layers[0], self.cfg.enc_dim, "IdentityAdapter")
        x = self.layer_average(layers)
        x = x if self.llm_proj is None else self.llm_proj(x)
        return _trim(x, frames, clips)

    @staticmethod
    def output_lengths(frames):
        return frames


def _trim(x: jax.Array, frames: jax.Array | None, clips: jax.Array | None) -> jax.Array:
    """Zero the positions at and past the batch's longest clip (what ALARM cuts and then zero-pads)."""
    if frames is None:
        return x
    return jnp.where(_time_mask(batch_frames(frames, clips, x.shape[1]), x.shape[1]), x, 0)
