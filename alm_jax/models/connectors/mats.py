"""MATS: the ClipCap-style mapper from a CLAP embedding to LLM tokens, text-side noise injection, and the
Santa memory (k-means over CLAP text embeddings; retrieval that pulls an audio embedding toward text).

    training (text only):  caption -> CLAP text tower -> normalize(normalize(e) + N(0, 0.015 I)) -> mapper -> LLM
    inference (audio):     clip -> CLAP audio tower -> Santa(z_a; memory of the training captions) -> mapper -> LLM

`MatsConnector.from_text` is the training path (the ALM feeds it its CLAP encoder's text embeddings, see
`AudioLanguageModel.embed_inputs`), `MatsConnector.__call__` the audio path; `MatsConnector.set_santa` attaches a
`SantaMemory` to the audio path (inference; `alm santa` builds and saves it, the evaluation answerer loads it).

Reference: MATS-LLaMA `models/{mapper,utils,mats,base_model}.py` (`TransformerMapper`, `noise_injection`,
`encode_text`, `encode_audio`, `kmeans_memory_bank`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig
from alm_jax.errors import CheckpointError, ConfigError
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule
from alm_jax.models.connectors.common import MultiHeadAttention, apply_dropout, make_dropout
from alm_jax.models.layers import LayerNorm, Linear, param

DEFAULT_NOISE_STD = math.sqrt(0.015)  # MATS `noise_variance = 0.015`


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch `F.normalize`), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def noise_injection(x: jax.Array, std: float, rng: jax.Array) -> jax.Array:
    """normalize(normalize(x) + N(0, std^2)). x `[..., dim]` -> same shape, float32. (With std = 0 this is
    just normalize(x); the reference returns x untouched then, which the mapper normalizes anyway.)"""
    x = l2_normalize(x)
    if std:
        x = x + std * jax.random.normal(rng, x.shape, jnp.float32)
    return l2_normalize(x)


class CaptionNoise(nnx.Module):
    """MATS' noise injection on the text embedding in training: `noise_injection(x, std, key)` with a key drawn
    from the model's `dropout` stream (its counter is running state: the train step carries it, the checkpoint
    saves it, so every step draws new noise and a resumed run draws the same). In eval mode (`model.eval()`
    sets `deterministic`) it only normalizes. x `[..., dim]` -> same shape, float32."""

    def __init__(self, std: float, rngs: nnx.Rngs, *, deterministic: bool = False):
        if std < 0:
            raise ConfigError(f"CaptionNoise: std={std} must be >= 0")
        self.std, self.deterministic = float(std), deterministic
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or not self.std:
            return l2_normalize(x)
        return noise_injection(x, self.std, self.rngs())


# --------------------------------------------------------------------------------------------------
# Mapper

@dataclasses.dataclass(frozen=True)
class ClipCapMapperConfig:
    """MATS-LLaMA defaults: CLAP 1024 -> 40 tokens of width 1024, 8 pre-LN layers (8 heads, mlp_ratio 2,
    ReLU), then Linear(1024 -> 4096) to Vicuna-7B."""

    clip_dim: int = 1024
    d: int = 1024                # mapper width (`mapper_dim`)
    clip_length: int = 40        # tokens made from the embedding
    prefix_length: int = 40      # learned constants; the output keeps these positions
    layers: int = 8
    heads: int = 8
    mlp_ratio: float = 2.0
    activation: str = "relu"     # "relu" | "gelu"
    dropout: float = 0.0
    llm_dim: int = 4096
    normalize_input: bool = True  # MATS L2-normalizes the CLAP embedding before the mapper


class _MapperLayer(nnx.Module):
    """x += Attn(LN1 x) (q/k/v without bias, output projection with bias); x += MLP(LN2 x). `[b, n, d]`."""

    def __init__(self, cfg: ClipCapMapperConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}[cfg.activation]
        self.norm1 = LayerNorm(cfg.d, **kw)
        self.attn = MultiHeadAttention(cfg.d, cfg.d, cfg.d, cfg.heads, qkv_bias=False, out_bias=True,
                                       dropout=0.0, rngs=rngs, **kw)
        self.norm2 = LayerNorm(cfg.d, **kw)
        hidden = int(cfg.d * cfg.mlp_ratio)
        self.fc1 = Linear(cfg.d, hidden, axes=("conn_embed", "conn_mlp"), use_bias=True, rngs=rngs, **kw)
        self.fc2 = Linear(hidden, cfg.d, axes=("conn_mlp", "conn_embed"), use_bias=True, rngs=rngs, **kw)
        self.dropout = make_dropout(cfg.dropout, rngs)

    def __call__(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h)
        y = apply_dropout(self.dropout, self.act(self.fc1(self.norm2(x))))
        return x + apply_dropout(self.dropout, self.fc2(y))


class ClipCapMapper(nnx.Module):
    """CLAP embedding `[batch, clip_dim]` -> `[batch, prefix_length, llm_dim]`.

    Linear(clip_dim -> clip_length * d) reshaped to `clip_length` tokens, concatenated with
    `prefix_length` learned constants `[prefix_length, d]`, L pre-LN transformer layers, keep the last
    `prefix_length` positions, Linear(d -> llm_dim).
    """

    def __init__(self, cfg: ClipCapMapperConfig = ClipCapMapperConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.activation not in ("relu", "gelu"):
            raise ConfigError(f"ClipCapMapperConfig.activation={cfg.activation!r}: use 'relu' or 'gelu'")
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.linear = Linear(cfg.clip_dim, cfg.clip_length * cfg.d, axes=("conn_embed", "conn_mlp"),
                             use_bias=True, rngs=rngs, **kw)
        self.prefix_const = param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.prefix_length, cfg.d),
                                                               param_dtype), ("queries", "conn_embed"))
        self.layers = nnx.List([_MapperLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.layers)])
        self.llm_proj = Linear(cfg.d, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                               rngs=rngs, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.cfg
        if z.ndim != 2 or z.shape[-1] != cfg.clip_dim:
            raise ConfigError(f"ClipCapMapper: expected [batch, {cfg.clip_dim}], got {tuple(z.shape)}")
        if cfg.normalize_input:
            z = l2_normalize(z)
        b = z.shape[0]
        x = self.linear(z).reshape(b, cfg.clip_length, cfg.d)
        prefix = jnp.broadcast_to(self.prefix_const[...].astype(self.dtype)[None], (b, cfg.prefix_length, cfg.d))
        x = jnp.concatenate([x, prefix], axis=1)
        for layer in self.layers:
            x = layer(x)
        return self.llm_proj(x[:, cfg.clip_length:])


# --------------------------------------------------------------------------------------------------
# k-means and the Santa memory

def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
    """Squared L2 distances `[n, d] x [k, d] -> [n, k]` without the `[n, k, d]` intermediate."""
    x, c = x.astype(jnp.float32), c.astype(jnp.float32)
    d = (jnp.sum(x * x, -1)[:, None] - 2.0 * jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST)
         + jnp.sum(c * c, -1)[None, :])
    return jnp.maximum(d, 0.0)


def kmeans(x: jax.Array, n_clusters: int, iters: int, seed: int = 0):
    """Lloyd's k-means. x `[n, d]` -> (centroids `[K, d]`, assignment `[n]` int32, inertia `[iters + 1]`).

    Init: K distinct rows chosen by `jax.random.permutation(PRNGKey(seed), n)` (deterministic per seed).
    Each iteration assigns every row to its nearest centroid and moves each centroid to its members'
    mean; a cluster left empty keeps its centroid (as the reference). inertia[t] is the sum of squared
    distances to the nearest centroid *before* update t (the last entry: after the final update), so it
    never increases. The returned assignment is to the final centroids.
    """
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ConfigError(f"kmeans: n_clusters={n_clusters} must be between 1 and the number of entries ({n})")
    x = x.astype(jnp.float32)
    init = x[jax.random.permutation(jax.random.PRNGKey(seed), n)[:n_clusters]]

    def step(c, _):
        d = _sq_dists(x, c)
        a = jnp.argmin(d, axis=1)
        inertia = jnp.min(d, axis=1).sum()
        sums = jax.ops.segment_sum(x, a, num_segments=n_clusters)
        counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), a, num_segments=n_clusters)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
        return new, inertia

    centroids, history = jax.lax.scan(step, init, None, length=iters)
    d = _sq_dists(x, centroids)
    assign = jnp.argmin(d, axis=1).astype(jnp.int32)
    history = jnp.concatenate([history, jnp.min(d, axis=1).sum()[None]])
    return centroids, assign, history


class SantaBank(nnx.Variable):
    """Non-trainable memory state (bank, centroids, assignment): part of the model state, so it is
    checkpointed, but never selected by `nnx.Param` filters."""


@dataclasses.dataclass(frozen=True)
class SantaConfig:
    """MATS Santa defaults: K=100 clusters, 10 k-means iterations, top-32, softmax(10 * dot), lambda 0.3."""

    n_clusters: int = 100
    iters: int = 10
    k: int = 32
    tau: float = 10.0
    lam: float = 0.3
    noise_std: float = DEFAULT_NOISE_STD
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SantaMix:
    """The steps of one Santa retrieval (`SantaMemory.mix`)."""
    indices: jax.Array   # [batch, k] int32 bank rows, nearest first
    entries: jax.Array   # [batch, k, dim] the retrieved rows after noise injection (normalized)
    weights: jax.Array   # [batch, k] softmax(tau * <z_a, entries>)
    z: jax.Array         # [batch, dim] normalize((1 - lam) z_a + lam * sum_i weights_i entries_i)


class SantaMemory(nnx.Module):
    """Santa retrieval memory over L2-normalized CLAP text embeddings.

    State (`SantaBank`): bank `[n, dim]`, centroids `[K, dim]`, assign `[n]` int32. Build with
    `SantaMemory.from_embeddings(text_emb, cfg)` (runs k-means), or construct empty with the sizes (e.g.
    for `nnx.eval_shape` before restoring a checkpoint) and `fit(...)`.

    `__call__(z_a, rng)` `[batch, dim]` -> `[batch, dim]`: nearest centroid by L2; the top-k bank entries
    of that cluster by L2 (a cluster with fewer than k entries is padded by repeating its first entry, as
    the reference does); noise injection on them; w = softmax(tau * <z_a, m_i>);
    z = normalize((1 - lam) z_a + lam * sum_i w_i m_i). As in the reference, z_a is NOT normalized before
    the distances and dot products (CLAP audio embeddings come un-normalized); only z is.
    """

    def __init__(self, n_entries: int, dim: int, cfg: SantaConfig = SantaConfig()):
        if cfg.k > n_entries:
            raise ConfigError(f"SantaMemory: k={cfg.k} exceeds the bank size {n_entries}; lower SantaConfig.k")
        if not 1 <= cfg.n_clusters <= n_entries:
            raise ConfigError(f"SantaMemory: n_clusters={cfg.n_clusters} must be in [1, {n_entries}]")
        self.cfg = cfg
        self.bank = SantaBank(jnp.zeros((n_entries, dim), jnp.float32))
        self.centroids = SantaBank(jnp.zeros((cfg.n_clusters, dim), jnp.float32))
        self.assign = SantaBank(jnp.zeros((n_entries,), jnp.int32))

    @classmethod
    def from_embeddings(cls, text_embeddings, cfg: SantaConfig = SantaConfig(), *, normalize: bool = True):
        """Build the memory from text embeddings `[n, dim]` (L2-normalized first unless `normalize=False`)."""
        emb = jnp.asarray(text_embeddings, jnp.float32)
        mem = cls(emb.shape[0], emb.shape[1], cfg)
        mem.fit(emb, normalize=normalize)
        return mem

    def fit(self, text_embeddings, *, normalize: bool = True) -> jax.Array:
        """Store the bank and run k-means; returns the inertia history `[iters + 1]`."""
        emb = jnp.asarray(text_embeddings, jnp.float32)
        if emb.shape != self.bank.shape:
            raise ConfigError(f"SantaMemory.fit: got embeddings {emb.shape}, the memory holds {self.bank.shape}")
        emb = l2_normalize(emb) if normalize else emb
        centroids, assign, history = kmeans(emb, self.cfg.n_clusters, self.cfg.iters, self.cfg.seed)
        self.bank.set_value(emb)
        self.centroids.set_value(centroids)
        self.assign.set_value(assign)
        return history

    def retrieve_indices(self, z_a: jax.Array, k: int | None = None) -> jax.Array:
        """Bank indices `[batch, k]` of the top-k entries (nearest first) inside z_a's nearest cluster."""
        k = self.cfg.k if k is None else k
        z = z_a.astype(jnp.float32)
        cluster = jnp.argmin(_sq_dists(z, self.centroids[...]), axis=1)              # [b]
        member = self.assign[...][None, :] == cluster[:, None]                        # [b, n]
        d = jnp.where(member, _sq_dists(z, self.bank[...]), jnp.inf)
        neg, idx = jax.lax.top_k(-d, k)                                               # nearest first
        first = jnp.argmax(member, axis=1)                                            # lowest member index
        return jnp.where(jnp.isfinite(neg), idx, first[:, None]).astype(jnp.int32)

    def retrieve(self, z_a: jax.Array, rng: jax.Array | None, k: int | None = None) -> jax.Array:
        """Noise-injected retrieved entries `[batch, k, dim]` (no noise when rng is None or noise_std=0)."""
        m = self.bank[...][self.retrieve_indices(z_a, k)]
        if rng is None or not self.cfg.noise_std:
            return l2_normalize(m)
        return noise_injection(m, self.cfg.noise_std, rng)

    def mix(self, z_a: jax.Array, rng: jax.Array | None = None, *, lam: float | None = None,
            k: int | None = None) -> "SantaMix":
        """Every step of the retrieval for `z_a` `[batch, dim]` (see the class docstring): the retrieved bank
        indices `[batch, k]` (nearest first), their noise-injected embeddings `[batch, k, dim]`, the weights
        softmax(tau * <z_a, m_i>) `[batch, k]` and the mixed, normalized embedding `[batch, dim]`."""
        lam = self.cfg.lam if lam is None else lam
        z = z_a.astype(jnp.float32)
        idx = self.retrieve_indices(z, k)
        m = self.bank[...][idx]
        m = l2_normalize(m) if rng is None or not self.cfg.noise_std else noise_injection(m, self.cfg.noise_std, rng)
        w = jax.nn.softmax(self.cfg.tau * jnp.einsum("bd,bkd->bk", z, m), axis=-1)
        out = l2_normalize((1.0 - lam) * z + lam * jnp.einsum("bk,bkd->bd", w, m))
        return SantaMix(indices=idx, entries=m, weights=w, z=out)

    def __call__(self, z_a: jax.Array, rng: jax.Array | None = None, *, lam: float | None = None,
                 k: int | None = None) -> jax.Array:
        """The mixed embedding `[batch, dim]` (`mix(...).z`; with lam = 0 just normalize(z_a), no retrieval)."""
        lam = self.cfg.lam if lam is None else lam
        if lam == 0:
            return l2_normalize(z_a)
        return self.mix(z_a, rng, lam=lam, k=k).z

    # ---- persistence (safetensors; the config goes in the header metadata)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file
        tensors = {"bank": np.asarray(self.bank[...]), "centroids": np.asarray(self.centroids[...]),
                   "assign": np.asarray(self.assign[...])}
        save_file(tensors, str(path), metadata={"santa_config": json.dumps(dataclasses.asdict(self.cfg))})

    @classmethod
    def load(cls, path: str | Path) -> "SantaMemory":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"Santa memory file {path} does not exist; build it with SantaMemory.save")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if "santa_config" not in meta or keys != {"bank", "centroids", "assign"}:
                    raise CheckpointError(f"{path} is not a Santa memory file (keys {sorted(keys)}, "
                                          f"metadata {sorted(meta)}); expected bank/centroids/assign + santa_config")
                cfg = SantaConfig(**json.loads(meta["santa_config"]))
                bank = f.get_tensor("bank")
                mem = cls(bank.shape[0], bank.shape[1], cfg)
                mem.bank.set_value(jnp.asarray(bank))
                for name in ("centroids", "assign"):
                    arr = f.get_tensor(name)
                    var = getattr(mem, name)
                    if arr.shape != var.shape:
                        raise CheckpointError(f"{path}: {name} has shape {arr.shape}, expected {var.shape}")
                    var.set_value(jnp.asarray(arr, var.dtype))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors header/format errors
            raise CheckpointError(f"cannot read Santa memory file {path}: {e}") from e
        return mem


MATS_HEADS = 8   # the published mapper's attention heads (`model.connector.num_heads` 0)


class MatsConnector(Connector):
    """Registry kind `mats`: MATS's mapper between a CLAP embedding and the LLM (fixed `mapper_tokens` per clip).

    Audio path (`__call__`, inference): encoder 0's last state entry mean-pooled over the clip's valid frames
    `[N, enc_dim]` (a CLAP encoder has one frame, its clip embedding), mixed by Santa when a memory is attached
    (`set_santa`), -> `ClipCapMapper` -> `[N, mapper_tokens, llm_dim]`.
    Text path (`from_text`, MATS training): CLAP text embeddings `[N, enc_dim]` -> noise injection in training
    (`model.connector.noise_variance`, published 0.015; `CaptionNoise`) -> the same mapper.
    The mapper depth is `model.connector.num_layers` (published 8), its width `hidden` (0: the encoder's), its
    heads `num_heads` (0: the published 8)."""
    kind = "mats"

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        return TokenRule(fixed=cc.mapper_tokens)

    def __init__(self, cc: ConnectorConfig, encoders, llm_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        enc: EncoderInfo = encoders[0]
        self.encoder_taps = ((enc.n_entries - 1,),)
        self.frame_rule = (enc.frames, enc.convention)
        mcfg = ClipCapMapperConfig(clip_dim=enc.dim, d=cc.hidden or enc.dim, clip_length=cc.mapper_tokens,
                                   prefix_length=cc.mapper_tokens, layers=cc.num_layers,
                                   heads=cc.num_heads or MATS_HEADS, llm_dim=llm_dim)
        self.mapper = ClipCapMapper(mcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cc.noise_variance < 0:
            raise ConfigError(f"model.connector.noise_variance={cc.noise_variance} must be >= 0 (MATS: 0.015)")
        self.noise = CaptionNoise(math.sqrt(cc.noise_variance), rngs) if cc.noise_variance > 0 else None
        self.santa = nnx.data(None)

    def set_santa(self, memory: SantaMemory | None) -> None:
        """Attach (or, with None, detach) the Santa memory the audio path mixes its embeddings with."""
        if memory is not None and memory.bank.shape[1] != self.mapper.cfg.clip_dim:
            raise ConfigError(f"the Santa memory holds {memory.bank.shape[1]}-dim embeddings but the MATS mapper takes "
                              f"{self.mapper.cfg.clip_dim}; build it with this run's CLAP (`alm santa`)")
        self.santa = memory

    def __call__(self, states, audio_samples: jax.Array) -> jax.Array:
        last = states[0][-1]
        frames = encoder_frames(audio_samples, *self.frame_rule)
        valid = (jnp.arange(last.shape[1])[None] < frames[:, None]).astype(jnp.float32)
        pooled = (last.astype(jnp.float32) * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1), 1.0)[:, None]
        if self.santa is not None:   # MATS inference: the retrieved entries are noise-injected (a fixed key)
            pooled = self.santa(pooled, jax.random.PRNGKey(self.santa.cfg.seed))
        return self.mapper(pooled)

    def from_text(self, text_embeddings: jax.Array) -> jax.Array:
        """CLAP text embeddings `[N, enc_dim]` -> `[N, mapper_tokens, llm_dim]`, noise-injected in training."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[-1] != self.mapper.cfg.clip_dim:
            raise ConfigError(f"MATS text path: expected text embeddings [N, {self.mapper.cfg.clip_dim}], got "
                              f"{tuple(text_embeddings.shape)}; the CLAP encoder's projection_dim must be its width")
        z = l2_normalize(text_embeddings)
        return self.mapper(z if self.noise is None else self.noise(z))
