"""ALARM per-encoder adapters: softmax layer average, then a conv downsampler to half the frame rate
(`AlarmAdapter`), a 2-layer MLP (`MLPAdapter`, for 25 Hz encoders such as MuQ) or nothing
(`IdentityAdapter`, the Perceiver inputs of ALARM-P), then an optional projection to the LLM width.

Reference: ALARM `adapter_implementations/{base,downsampler_conformer,mlp,identity}.py` with
`use_conformer: false`, `downsampler_depth: 1`, `pre_average: true`.
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

    hidden_states: list of `[batch, frames, enc_dim]` -> `[batch, ceil(frames / 2), llm_dim]`.
    The input Linear is omitted when `enc_dim == hidden` (ALARM uses Identity then). Norm "layer" is a
    LayerNorm over channels; "batch" is `BatchNorm1d` (batch statistics + running-average update while
    training, running statistics under `model.eval()` / `use_running_average=True`, e.g. when frozen).
    """

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
            return BatchNorm1d(dim, momentum=self.cfg.bn_momentum, eps=self.cfg.norm_eps, axis_name=axis_name,
                               use_running_average=use_running_average, **kw)
        return LayerNorm(dim, axis_name=axis_name, eps=self.cfg.norm_eps, **kw)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array) -> jax.Array:
        cfg = self.cfg
        layers = select_taps(hidden_states, cfg.layers, "AlarmAdapter")
        check_last_dim(layers[0], cfg.enc_dim, "AlarmAdapter")
        x = self.layer_average(layers)
        if self.input_proj is not None:
            x = self.input_proj(x)
        if x.shape[1] % 2:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
        x = self.norm1(gelu(self.conv1(x)))
        x = self.norm2(gelu(self.conv2(x)))
        return self.llm_proj(x)

    @staticmethod
    def output_lengths(lengths: jax.Array | int) -> jax.Array | int:
        """Tokens for `lengths` valid frames: ceil(T / 2). (ALARM's `calc_length` uses T // 2, dropping the
        last token of an odd-length clip from its mask; we keep it, it saw one real frame.)"""
        return (lengths + 1) // 2


@dataclasses.dataclass(frozen=True)
class MLPAdapterConfig:
    """Defaults: ALARM's MuQ adapter (25 Hz native, 1024 wide)."""

    layers: tuple[int, ...] = (4, 8, 12)
    enc_dim: int = 1024
    hidden: int = 1024
    llm_dim: int = 2560


class MLPAdapter(nnx.Module):
    """Layer average -> Linear(enc -> hidden) -> GELU -> Linear(hidden -> hidden) -> GELU -> Linear(hidden ->
    llm_dim) (ALARM's MLP ends in a GELU before its `llm_proj`). `[batch, frames, enc_dim]` list ->
    `[batch, frames, llm_dim]`; the frame rate is unchanged."""

    def __init__(self, cfg: MLPAdapterConfig = MLPAdapterConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_average = LayerSoftmaxAverage(len(cfg.layers), **kw)
        self.fc1 = Linear(cfg.enc_dim, cfg.hidden, axes=("conn_embed", "conn_mlp"), use_bias=True, rngs=rngs, **kw)
        self.fc2 = Linear(cfg.hidden, cfg.hidden, axes=("conn_mlp", "conn_embed"), use_bias=True, rngs=rngs, **kw)
        self.llm_proj = Linear(cfg.hidden, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                               rngs=rngs, **kw)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array) -> jax.Array:
        layers = select_taps(hidden_states, self.cfg.layers, "MLPAdapter")
        check_last_dim(layers[0], self.cfg.enc_dim, "MLPAdapter")
        x = self.layer_average(layers)
        return self.llm_proj(gelu(self.fc2(gelu(self.fc1(x)))))


@dataclasses.dataclass(frozen=True)
class IdentityAdapterConfig:
    """Defaults: ALARM-P's W2V-BERT input (raw layer-averaged features, no projection)."""

    layers: tuple[int, ...] = (6, 10, 15, 20, 24)
    enc_dim: int = 1024
    llm_dim: int | None = None   # None: no projection (ALARM `use_llm_proj: false`)


class IdentityAdapter(nnx.Module):
    """Layer average, then optionally Linear(enc -> llm_dim). `[batch, frames, enc_dim]` list ->
    `[batch, frames, llm_dim or enc_dim]`."""

    def __init__(self, cfg: IdentityAdapterConfig = IdentityAdapterConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_average = LayerSoftmaxAverage(len(cfg.layers), dtype=dtype, param_dtype=param_dtype)
        self.llm_proj = (Linear(cfg.enc_dim, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs) if cfg.llm_dim else None)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array) -> jax.Array:
        layers = select_taps(hidden_states, self.cfg.layers, "IdentityAdapter")
        check_last_dim(layers[0], self.cfg.enc_dim, "IdentityAdapter")
        x = self.layer_average(layers)
        return x if self.llm_proj is None else self.llm_proj(x)
