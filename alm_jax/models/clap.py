"""CLAP (HF `ClapModel`, LAION-CLAP) in Flax NNX: an HTSAT (Swin) audio tower and a RoBERTa text tower, each
with a 2-layer projection into a shared, L2-normalised embedding space (MATS feeds these embeddings to its mapper).

Audio tower (HF `ClapAudioEncoder`), input_features `[batch, channels, frames, mel]` (channels = 1, or 4 with
`enable_fusion`: channel 0 the global down-sampled clip, 1..3 three local crops):
    BatchNorm over the mel bins (running statistics) -> bicubic resize of time to spec_size * freq_ratio
    (align_corners, only when shorter) -> "mel2img": fold time into freq_ratio rows, image `[spec_size, spec_size]`
    -> patch embed (Conv2d patch_size/patch_stride, fusion: the local crops through mel_conv2d and an attentional
    feature fusion (AFF) block for rows with is_longer) -> LayerNorm
    -> stages of Swin blocks (window attention with a learned relative position bias; odd blocks cyclically
    shifted by window_size // 2 with the -100 region mask), patch merging (2x2 -> LayerNorm -> Linear 4C -> 2C)
    between stages -> LayerNorm -> mean over all tokens (`pooler_output`, `[batch, num_features]`).
Text tower (HF `ClapTextModel` = RoBERTa): word + position (counted from padding_idx + 1, padding gets
padding_idx) + token-type embeddings -> LayerNorm -> post-LN encoder layers -> tanh pooler on token 0.
`audio_embeds` / `text_embeds` = normalize(projection(pooled)) = HF `get_audio_features` / `get_text_features`.

`ClapAudioOutput.hidden_states`: token sequences `[batch, H*W, C]` with HF's indexing (L + 1 entries: [0] the
patch embedding, [i] the output of stage i after its patch merging); `block_outputs` = hidden_states[1:].
Parameter names mirror HF's so that the key table stays a renaming.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alm_jax.audio.clap_device import clap_features_16k
from alm_jax.audio.clap_features import ClapFeatureSettings
from alm_jax.errors import AudioError, ConfigError
from alm_jax.models.layers import Embed, LayerNorm, Linear, param

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu, "tanh": jnp.tanh}


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _check_act(name: str, where: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"clap: {where}={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")


def _fields(cls, config: Mapping[str, Any]) -> dict:
    return {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}


@dataclasses.dataclass(frozen=True)
class ClapTextConfig:
    """The architecture fields of an HF `ClapTextConfig` (defaults = HF's)."""
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"clap text: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        _check_act(self.hidden_act, "text_config.hidden_act")


@dataclasses.dataclass(frozen=True)
class ClapAudioConfig:
    """The architecture fields of an HF `ClapAudioConfig` (defaults = HF's = laion/clap-htsat-unfused's)."""
    window_size: int = 8
    num_mel_bins: int = 64
    spec_size: int = 256
    hidden_act: str = "gelu"
    patch_size: Any = 4
    patch_stride: Any = (4, 4)
    hidden_size: int = 768
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)
    enable_fusion: bool = False
    fusion_type: str | None = None
    patch_embed_input_channels: int = 1
    flatten_patch_embeds: bool = True
    patch_embeds_hidden_size: int = 96
    enable_patch_layer_norm: bool = True
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    aff_block_r: int = 4
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_attention_heads", tuple(int(h) for h in self.num_attention_heads))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        object.__setattr__(self, "patch_stride", _pair(self.patch_stride))
        _check_act(self.hidden_act, "audio_config.hidden_act")
        if len(self.depths) != len(self.num_attention_heads):
            raise ConfigError(f"clap audio: depths {self.depths} and num_attention_heads {self.num_attention_heads} "
                              "must have the same length")
        if self.enable_fusion and self.fusion_type == "channel_map":
            raise ConfigError("clap audio: fusion_type='channel_map' is not supported (HF's own forward cannot run "
                              "it); use the AFF fusion (fusion_type None or 'aff_2d')")
        if not self.flatten_patch_embeds:
            raise ConfigError("clap audio: flatten_patch_embeds=false is not supported (HF's encoder needs it)")
        if self.patch_embed_input_channels != 1:
            raise ConfigError("clap audio: patch_embed_input_channels must be 1 (one mel image per channel)")
        if self.spec_size % self.num_mel_bins:
            raise ConfigError(f"clap audio: spec_size={self.spec_size} must be a multiple of "
                              f"num_mel_bins={self.num_mel_bins}")
        if self.hidden_size != self.num_features:
            raise ConfigError(f"clap audio: hidden_size={self.hidden_size} must equal patch_embeds_hidden_size * "
                              f"2 ** (stages - 1) = {self.num_features} (the projection's input)")
        for i, (h, w) in enumerate(self.resolutions):
            dim = self.patch_embeds_hidden_size * 2 ** i
            if dim % self.num_attention_heads[i]:
                raise ConfigError(f"clap audio: stage {i} width {dim} is not divisible by "
                                  f"num_attention_heads[{i}]={self.num_attention_heads[i]}")
            if min(h, w) < self.window_size:
                raise ConfigError(f"clap audio: stage {i} resolution {(h, w)} is smaller than window_size="
                                  f"{self.window_size} (HF cannot run this config either)")

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.num_mel_bins

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1]

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        g = self.grid
        return [(g[0] // 2 ** i, g[1] // 2 ** i) for i in range(len(self.depths))]

    @property
    def num_features(self) -> int:
        return self.patch_embeds_hidden_size * 2 ** (len(self.depths) - 1)

    @property
    def encoder_layers(self) -> int:   # the names the ALM reads (as on WhisperEncoderConfig): stages, width
        return len(self.depths)

    @property
    def d_model(self) -> int:
        return self.num_features


@dataclasses.dataclass(frozen=True)
class ClapConfig:
    """HF `ClapConfig`: the two towers and the shared projection."""
    text: ClapTextConfig = ClapTextConfig()
    audio: ClapAudioConfig = ClapAudioConfig()
    projection_dim: int = 512
    projection_hidden_act: str = "relu"

    def __post_init__(self):
        _check_act(self.projection_hidden_act, "projection_hidden_act")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ClapConfig":
        """From an HF `config.json` dict of model_type "clap" (missing keys take HF's defaults)."""
        if config.get("model_type", "clap") != "clap":
            raise ConfigError(f"model_type={config.get('model_type')!r} is not a CLAP (clap) config")
        text = _fields(ClapTextConfig, config.get("text_config") or {})
        audio = _fields(ClapAudioConfig, config.get("audio_config") or {})
        if "fusion_type" in (config.get("audio_config") or {}):
            audio["fusion_type"] = config["audio_config"]["fusion_type"]
        return cls(text=ClapTextConfig(**text), audio=ClapAudioConfig(**audio),
                   **{k: config[k] for k in ("projection_dim", "projection_hidden_act") if config.get(k) is not None})


# ---- numeric helpers ----------------------------------------------------------------------------------------

def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """`[n_out, n_in]` float32 weights of torch's 1-D bicubic resize with align_corners=True (A = -0.75, edge
    indices clamped), computed in float32 as torch does."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    real = scale * np.arange(n_out, dtype=np.float32)
    idx = np.floor(real).astype(np.int64)
    t = (real - idx.astype(np.float32)).astype(np.float32)
    a = np.float32(a)

    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    weights = [far(t + 1), near(t), near(1 - t), far(2 - t)]
    m = np.zeros((n_out, n_in), np.float32)
    for k, w in enumerate(weights):
        np.add.at(m, (np.arange(n_out), np.clip(idx - 1 + k, 0, n_in - 1)), w.astype(np.float32))
    return m


def relative_position_index(window: int) -> np.ndarray:
    """`[w*w, w*w]` index into the `(2w-1)^2`-row bias table (HF/Swin layout)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """`[num_windows, w*w, w*w]` float32: 0 within a cyclic-shift region, -100 across regions (HF/Swin)."""
    def region(n):
        i = np.arange(n)
        return (i >= n - window).astype(np.int64) + (i >= n - shift).astype(np.int64)
    img = (region(height)[:, None] * 3 + region(width)[None, :]).astype(np.float32)
    win = img.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride, padding) -> jax.Array:
    """x `[b, h, w, in]`, kernel `[kh, kw, in, out]` -> `[b, h', w', out]` (torch Conv2d semantics)."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=tuple(stride),
                                     padding=[(padding[0], padding[0]), (padding[1], padding[1])],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias.astype(x.dtype)


# ---- shared pieces ------------------------------------------------------------------------------------------

class BatchNorm(nnx.Module):
    """Inference BatchNorm over the last axis: (x - running_mean) / sqrt(running_var + eps) * scale + bias.
    The running statistics are `nnx.BatchStat`s (loaded, never updated here)."""

    def __init__(self, dim: int, *, axis_name: str | None, eps: float = 1e-5, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        f = jnp.float32
        y = (x.astype(f) - self.mean[...].astype(f)) * jax.lax.rsqrt(self.var[...].astype(f) + self.eps)
        return (y * self.scale[...].astype(f) + self.bias[...].astype(f)).astype(self.dtype)


class Conv2d(nnx.Module):
    """torch-style Conv2d on NHWC: kernel `[kh, kw, in, out]` (torch `[out, in, kh, kw]`)."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding, *, axes, dtype, param_dtype, rngs):
        kernel = _pair(kernel)
        self.stride, self.padding, self.dtype = _pair(stride), _pair(padding), dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(init(rngs.params(), (*kernel, cin, cout), param_dtype), ("conv_kernel", None) + axes)
        self.bias = param(jnp.zeros((cout,), param_dtype), (axes[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(x.astype(self.dtype), self.kernel[...], self.bias[...], self.stride, self.padding)


class ClapProjection(nnx.Module):
    """linear2(act(linear1(x))): `[..., hidden]` -> `[..., projection_dim]`."""

    def __init__(self, hidden: int, cfg: ClapConfig, *, axes, dtype, param_dtype, rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.projection_hidden_act]
        self.linear1 = Linear(hidden, cfg.projection_dim, axes=axes, **kw)
        self.linear2 = Linear(cfg.projection_dim, cfg.projection_dim, axes=(axes[1], None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(self.act(self.linear1(x)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch `F.normalize(x, dim=-1)`: x / max(||x||, eps), in float32."""
    xf = x.astype(jnp.float32)
    return xf / jnp.maximum(jnp.linalg.norm(xf, axis=-1, keepdims=True), eps)


# ---- audio tower (HTSAT) ------------------------------------------------------------------------------------

class ClapAFF(nnx.Module):
    """Attentional feature fusion (HF `ClapAudioAFFBlock`): w = sigmoid(local_att(x + r) + global_att(x + r)),
    out = 2 x w + 2 r (1 - w). Each branch: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN (global: after a spatial mean).
    1x1 convs are Linear kernels `[in, out]`; x, r `[b, h, w, c]`."""

    def __init__(self, cfg: ClapAudioConfig, *, dtype, param_dtype, rngs):
        c = cfg.patch_embeds_hidden_size
        inter = int(c // cfg.aff_block_r)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(axis_name="audio_embed", dtype=dtype, param_dtype=param_dtype)
        for branch in ("local", "global"):
            setattr(self, f"{branch}_conv1", Linear(c, inter, axes=("audio_embed", "audio_mlp"), **kw))
            setattr(self, f"{branch}_bn1", BatchNorm(inter, **{**bn, "axis_name": "audio_mlp"}))
            setattr(self, f"{branch}_conv2", Linear(inter, c, axes=("audio_mlp", "audio_embed"), **kw))
            setattr(self, f"{branch}_bn2", BatchNorm(c, **bn))

    def _branch(self, name: str, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(getattr(self, f"{name}_bn1")(getattr(self, f"{name}_conv1")(x)))
        return getattr(self, f"{name}_bn2")(getattr(self, f"{name}_conv2")(h))

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        s = x + residual
        w = jax.nn.sigmoid(self._branch("local", s) + self._branch("global", s.mean(axis=(1, 2), keepdims=True)))
        return 2 * x * w + 2 * residual * (1 - w)


class ClapPatchEmbed(nnx.Module):
    """image `[b, H, W, channels]` (+ is_longer `[b]` bool with fusion) -> tokens `[b, H' W', C]`."""

    def __init__(self, cfg: ClapAudioConfig, *, dtype, param_dtype, rngs):
        (p0, p1), (s0, s1) = cfg.patch_size, cfg.patch_stride
        pad = ((p0 - s0) // 2, (p1 - s1) // 2)
        c = cfg.patch_embeds_hidden_size
        kw = dict(axes=("mel", "audio_embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.proj = Conv2d(cfg.patch_embed_input_channels, c, (p0, p1), (s0, s1), pad, **kw)
        self.norm = LayerNorm(c, dtype=dtype, param_dtype=param_dtype) if cfg.enable_patch_layer_norm else None
        if cfg.enable_fusion:
            self.fusion_model = ClapAFF(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.mel_conv2d = Conv2d(cfg.patch_embed_input_channels, c, (p0, 3 * p1), (s0, 3 * s1), pad, **kw)

    def __call__(self, x: jax.Array, is_longer: jax.Array | None) -> jax.Array:
        b, hh, ww, ch = x.shape
        h = self.proj(x[..., 0:1])                                              # [b, h, w, c]
        if self.cfg.enable_fusion:
            local = jnp.moveaxis(x[..., 1:], -1, 1).reshape(b * (ch - 1), hh, ww, 1)
            local = self.mel_conv2d(local)                                       # [b*3, h, w', c]
            _, lh, lw, c = local.shape
            local = local.reshape(b, ch - 1, lh, lw, c).transpose(0, 2, 1, 3, 4).reshape(b, lh, (ch - 1) * lw, c)
            width = h.shape[2]
            local = (jnp.pad(local, ((0, 0), (0, 0), (0, width - local.shape[2]), (0, 0)))
                     if local.shape[2] <= width else local[:, :, :width])
            fused = self.fusion_model(h, local)
            longer = jnp.zeros((b,), bool) if is_longer is None else jnp.asarray(is_longer).reshape(b).astype(bool)
            h = jnp.where(longer[:, None, None, None], fused, h)
        h = h.reshape(b, -1, h.shape[-1])
        return self.norm(h) if self.norm is not None else h


class ClapWindowAttention(nnx.Module):
    """Multi-head attention inside windows with a learned relative position bias (HF `ClapAudioSelfAttention`
    + output dense). Table `[(2w-1)^2, heads]`."""

    def __init__(self, cfg: ClapAudioConfig, dim: int, heads: int, *, dtype, param_dtype, rngs):
        w = cfg.window_size
        self.heads, self.head_dim, self.dtype, self.window = heads, dim // heads, dtype, w
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.relative_position_bias_table = param(
            nnx.initializers.truncated_normal(0.02)(rngs.params(), ((2 * w - 1) ** 2, heads), param_dtype),
            ("audio_pos", "audio_heads"))
        self.query = Linear(dim, dim, axes=("audio_embed", "audio_heads"), use_bias=cfg.qkv_bias, **kw)
        self.key = Linear(dim, dim, axes=("audio_embed", "audio_heads"), use_bias=cfg.qkv_bias, **kw)
        self.value = Linear(dim, dim, axes=("audio_embed", "audio_heads"), use_bias=cfg.qkv_bias, **kw)
        self.dense = Linear(dim, dim, axes=("audio_heads", "audio_embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x `[batch, windows, n, dim]` (n = w*w), mask `[windows, n, n]` additive or None -> same shape."""
        b, nw, n, d = x.shape
        split = lambda y: y.reshape(b, nw, n, self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(self.head_dim)
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[index]
        scores = scores + bias.reshape(n, n, self.heads).transpose(2, 0, 1)
        if mask is not None:
            scores = scores + jnp.asarray(mask)[None, :, None]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, d)
        return self.dense(out)


class ClapSwinBlock(nnx.Module):
    """x + attn(windows(roll(LN x))); x + mlp(LN x) (HF `ClapAudioLayer`); tokens `[b, H*W, C]`."""

    def __init__(self, cfg: ClapAudioConfig, dim: int, heads: int, resolution: tuple[int, int], shift: int, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.window = cfg.window_size
        self.shift = 0 if min(resolution) <= self.window else shift
        self.resolution = resolution
        self.act = ACTIVATIONS[cfg.hidden_act]
        hidden = int(cfg.mlp_ratio * dim)
        self.layernorm_before = LayerNorm(dim, **ln)
        self.attention = ClapWindowAttention(cfg, dim, heads, **kw)
        self.layernorm_after = LayerNorm(dim, **ln)
        self.intermediate = Linear(dim, hidden, axes=("audio_embed", "audio_mlp"), use_bias=True, **kw)
        self.output = Linear(hidden, dim, axes=("audio_mlp", "audio_embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        (height, width), w, s = self.resolution, self.window, self.shift
        b, _, c = x.shape
        h = self.layernorm_before(x).reshape(b, height, width, c)
        hp, wp = -(-height // w) * w, -(-width // w) * w
        h = jnp.pad(h, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
        if s:
            h = jnp.roll(h, (-s, -s), axis=(1, 2))
        win = h.reshape(b, hp // w, w, wp // w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, c)
        att = self.attention(win, shifted_window_mask(hp, wp, w, s) if s else None)
        att = att.reshape(b, hp // w, wp // w, w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if s:
            att = jnp.roll(att, (s, s), axis=(1, 2))
        x = x + att[:, :height, :width].reshape(b, height * width, c)
        return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class ClapPatchMerging(nnx.Module):
    """`[b, H*W, C]` -> `[b, ceil(H/2)*ceil(W/2), 2C]`: 2x2 neighbours concatenated (HF order), LN, Linear."""

    def __init__(self, dim: int, resolution: tuple[int, int], *, dtype, param_dtype, rngs):
        self.resolution = resolution
        self.norm = LayerNorm(4 * dim, dtype=dtype, param_dtype=param_dtype)
        self.reduction = Linear(4 * dim, 2 * dim, axes=("audio_mlp", "audio_embed"), use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = self.resolution
        b, _, c = x.shape
        h = jnp.pad(x.reshape(b, height, width, c), ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        h = jnp.concatenate([h[:, r::2, col::2] for col in range(2) for r in range(2)], axis=-1)
        return self.reduction(self.norm(h.reshape(b, -1, 4 * c)))


class ClapStage(nnx.Module):
    def __init__(self, cfg: ClapAudioConfig, i: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim, res = cfg.patch_embeds_hidden_size * 2 ** i, cfg.resolutions[i]
        self.blocks = nnx.List([ClapSwinBlock(cfg, dim, cfg.num_attention_heads[i], res,
                                              0 if j % 2 == 0 else cfg.window_size // 2, **kw)
                                for j in range(cfg.depths[i])])
        self.downsample = ClapPatchMerging(dim, res, **kw) if i < len(cfg.depths) - 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


@struct.dataclass
class ClapAudioOutput:
    """`pooler_output` `[batch, num_features]` (mean of the normed last tokens), `last_hidden_state` the normed
    last-stage tokens `[batch, H_L*W_L, num_features]`; `hidden_states` (L + 1 token sequences, HF indexing) and
    `block_outputs` (= hidden_states[1:])."""
    pooler_output: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    block_outputs: tuple[jax.Array, ...]


class ClapAudioEncoder(nnx.Module):
    """HTSAT: `input_features [batch, channels, frames, mel]` (+ is_longer `[batch]` / `[batch, 1]`) ->
    `ClapAudioOutput`. channels = 4 with enable_fusion (ClapFeatureExtractor 'fusion'), else 1."""

    def __init__(self, cfg: ClapAudioConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = cfg, dtype
        self.batch_norm = BatchNorm(cfg.num_mel_bins, axis_name="mel", dtype=jnp.float32, param_dtype=param_dtype)
        self.patch_embed = ClapPatchEmbed(cfg, **kw)
        self.layers = nnx.List([ClapStage(cfg, i, **kw) for i in range(len(cfg.depths))])
        self.norm = LayerNorm(cfg.num_features, dtype=dtype, param_dtype=param_dtype)

    def mel2img(self, feats: jax.Array) -> jax.Array:
        """Normalised features `[b, ch, T, F]` -> image `[b, spec_size, spec_size, ch]` (NHWC)."""
        cfg = self.config
        fr = cfg.freq_ratio
        spec_w, spec_h = cfg.spec_size * fr, cfg.spec_size // fr
        b, ch, t, f = feats.shape
        if t > spec_w or f > spec_h:
            raise AudioError(f"clap: input_features {feats.shape} exceed the model's {spec_w} frames x {spec_h} mel "
                             "bins; compute them with ClapFeatureExtractor for this checkpoint")
        if t < spec_w:   # HF resizes time to spec_w (bicubic, align_corners=True)
            feats = jnp.einsum("ot,bctf->bcof", jnp.asarray(bicubic_matrix(t, spec_w)), feats.astype(jnp.float32))
        if f < spec_h:   # HF then resizes to (original t, spec_h)
            feats = jnp.einsum("ot,bctf->bcof", jnp.asarray(bicubic_matrix(feats.shape[2], t)), feats)
            feats = jnp.einsum("gf,bctf->bctg", jnp.asarray(bicubic_matrix(f, spec_h)), feats)
        b, ch, t, f = feats.shape
        if t != spec_w or f != spec_h:
            raise AudioError(f"clap: resized features {feats.shape} are not {spec_w} x {spec_h} (as in HF)")
        img = feats.reshape(b, ch * fr, t // fr, f).transpose(0, 1, 3, 2).reshape(b, ch, f * fr, t // fr)
        return img.transpose(0, 2, 3, 1)

    def __call__(self, input_features: jax.Array, is_longer: jax.Array | None = None) -> ClapAudioOutput:
        cfg = self.config
        channels = 4 if cfg.enable_fusion else 1
        shape = input_features.shape
        if len(shape) != 4 or shape[1] != channels or shape[3] != cfg.num_mel_bins:
            raise AudioError(f"clap expects input_features [batch, {channels}, frames, {cfg.num_mel_bins}], got "
                             f"{input_features.shape}; compute them with ClapFeatureExtractor "
                             f"(truncation={'fusion' if cfg.enable_fusion else 'rand_trunc'})")
        x = self.batch_norm(input_features.astype(jnp.float32))
        x = self.patch_embed(self.mel2img(x).astype(self.dtype), is_longer)
        hidden = [x]
        for stage in self.layers:
            x = stage(x)
            hidden.append(x)
        last = self.norm(x)
        pooled = last.astype(jnp.float32).mean(axis=1).astype(self.dtype)
        return ClapAudioOutput(pooler_output=pooled, last_hidden_state=last, hidden_states=tuple(hidden),
                               block_outputs=tuple(hidden[1:]))


# ---- text tower (RoBERTa) -----------------------------------------------------------------------------------

class ClapTextLayer(nnx.Module):
    """Post-LN BERT layer: LN(x + attn(x)); LN(h + output(act(intermediate(h))))."""

    def __init__(self, cfg: ClapTextConfig, *, dtype, param_dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.query = Linear(d, d, axes=("embed", "heads"), **kw)
        self.key = Linear(d, d, axes=("embed", "heads"), **kw)
        self.value = Linear(d, d, axes=("embed", "heads"), **kw)
        self.attention_dense = Linear(d, d, axes=("heads", "embed"), **kw)
        self.attention_norm = LayerNorm(d, **ln)
        self.intermediate = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.output = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.output_norm = LayerNorm(d, **ln)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x `[b, t, d]`, mask `[b, t]` bool (True = token) -> `[b, t, d]`."""
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        h = self.attention_norm(x + self.attention_dense(att))
        return self.output_norm(h + self.output(self.act(self.intermediate(h))))


class ClapTextModel(nnx.Module):
    """RoBERTa: `input_ids [b, t]`, `attention_mask [b, t]` -> (last_hidden_state `[b, t, d]`, pooled `[b, d]`)."""

    def __init__(self, cfg: ClapTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = cfg, dtype
        self.word_embeddings = Embed(cfg.vocab_size, d, axes=("vocab", "embed"), **kw)
        self.position_embeddings = Embed(cfg.max_position_embeddings, d, axes=(None, "embed"), **kw)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, d, axes=(None, "embed"), **kw)
        self.embeddings_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([ClapTextLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.pooler = Linear(d, d, axes=("embed", None), use_bias=True, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ConfigError(f"clap text expects input_ids [batch, tokens], got shape {input_ids.shape}")
        pad = cfg.pad_token_id
        not_pad = (input_ids != pad).astype(jnp.int32)
        positions = jnp.cumsum(not_pad, axis=1) * not_pad + pad
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(jnp.zeros_like(input_ids))
             + self.position_embeddings(positions))
        x = self.embeddings_norm(x)
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        for layer in self.layers:
            x = layer(x, mask)
        return x, jnp.tanh(self.pooler(x[:, 0]))


# ---- the CLAP model -----------------------------------------------------------------------------------------

class ClapModel(nnx.Module):
    """Both towers and projections. `audio_embeds(input_features, is_longer)` / `text_embeds(input_ids,
    attention_mask)` -> `[batch, projection_dim]` float32, L2-normalised (HF get_audio_features /
    get_text_features); `audio(...)` gives the audio tower's `ClapAudioOutput`; `logits(...)` the scaled
    audio x text similarities (HF logits_per_audio)."""

    def __init__(self, cfg: ClapConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = cfg, dtype
        self.text_model = ClapTextModel(cfg.text, **kw)
        self.text_projection = ClapProjection(cfg.text.hidden_size, cfg, axes=("embed", "mlp"), **kw)
        self.audio_model = ClapAudioEncoder(cfg.audio, **kw)
        self.audio_projection = ClapProjection(cfg.audio.num_features, cfg, axes=("audio_embed", "audio_mlp"), **kw)
        init = jnp.log(jnp.asarray(1 / 0.07, param_dtype))
        self.logit_scale_a = param(init, ())
        self.logit_scale_t = param(init, ())

    def audio(self, input_features: jax.Array, is_longer: jax.Array | None = None) -> ClapAudioOutput:
        return self.audio_model(input_features, is_longer)

    def audio_embeds(self, input_features: jax.Array, is_longer: jax.Array | None = None) -> jax.Array:
        return l2_normalize(self.audio_projection(self.audio_model(input_features, is_longer).pooler_output))

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return l2_normalize(self.text_projection(self.text_model(input_ids, attention_mask)[1]))

    def logits(self, input_features, input_ids, attention_mask=None, is_longer=None) -> jax.Array:
        """`[audio_batch, text_batch]`: exp(logit_scale_a) * <audio_embeds, text_embeds>."""
        a, t = self.audio_embeds(input_features, is_longer), self.text_embeds(input_ids, attention_mask)
        return jnp.exp(self.logit_scale_a[...].astype(jnp.float32)) * a @ t.T


# ---- CLAP as a frozen ALM encoder ---------------------------------------------------------------------------

class ClapAudioTower(nnx.Module):
    """CLAP as an ALM encoder (`EncoderConfig.kind: clap`): 16 kHz waveforms `[N, S]` + valid samples `[N]` ->
    on-device features (`alm_jax.audio.clap_device`) -> HTSAT -> projection -> `[N, projection_dim]` L2-normalised
    clip embeddings (HF `get_audio_features`). One embedding per clip: the ALM sees it as a one-frame state
    `[N, 1, projection_dim]` (what MATS's mapper reads).

    The text tower rides along (frozen, like the audio side): `text_embeds(input_ids, attention_mask)` ->
    `[N, projection_dim]` (HF `get_text_features`), what MATS trains its mapper on instead of the audio."""

    def __init__(self, model: ClapModel, features: ClapFeatureSettings):
        if features.feature_size != model.config.audio.num_mel_bins:
            raise ConfigError(f"clap: the feature extractor gives {features.feature_size} mel bins but the audio "
                              f"tower takes {model.config.audio.num_mel_bins}; fix preprocessor_config.json")
        self.config, self.dtype, self.features = model.config, model.dtype, features
        self.audio_model = model.audio_model
        self.audio_projection = model.audio_projection
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    @property
    def d_model(self) -> int:
        return self.config.projection_dim

    def __call__(self, audio: jax.Array, samples: jax.Array) -> jax.Array:
        feats = clap_features_16k(audio, samples, self.features, fused=self.config.audio.enable_fusion)
        is_longer = jnp.zeros((audio.shape[0], 1), bool)
        pooled = self.audio_model(feats, is_longer).pooler_output
        return l2_normalize(self.audio_projection(pooled))

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids / attention_mask `[N, tokens]` (the CLAP tokenizer's) -> `[N, projection_dim]` float32,
        L2-normalised (HF `get_text_features`)."""
        return l2_normalize(self.text_projection(self.text_model(input_ids, attention_mask)[1]))
