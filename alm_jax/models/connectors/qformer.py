"""DeSTA2.5 Q-Former connector: learned queries per tapped encoder layer, one shared BERT-style
cross-attention stack, per-query softmax over taps, LayerNorm + Linear to the LLM width.

Reference: DeSTA2.5-Audio `QformerConnector` ("qformer_1"), whose stack is HF `BertEncoder` with
`is_decoder=True, add_cross_attention=True`, eager attention, called with no mask.

Attention mask note (transformers 5.23, checked in `modeling_bert.py` / `integrations/sdpa_attention.py`):
`BertEncoder` itself builds no mask. With `attention_mask=None` the **eager** path adds nothing, so the
query self-attention is bidirectional; this module reproduces that. The **SDPA** path instead sets
`is_causal = q_len > 1 and mask is None and module.is_causal`, and BERT's self-attention has
`is_causal = config.is_decoder = True`, so SDPA makes the query self-attention *causal*. DeSTA builds
`BertEncoder(BertConfig())` directly, leaving `_attn_implementation=None`, which 5.23 resolves to eager
(older versions raised `KeyError: None`, DeSTA issues #7/#8). `tests/test_connectors.py` pins these facts.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import ConnectorConfig
from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.models.connectors.base import Connector, EncoderInfo, TokenRule
from alm_jax.models.connectors.common import (
    BatchNorm1d, MultiHeadAttention, apply_dropout, check_last_dim, gelu, make_dropout, select_taps)
from alm_jax.models.layers import LayerNorm, Linear, param
from alm_jax.models.stack import check_remat, make_stack, run_stack, scanned_size, stack_length
from alm_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """DeSTA2.5 defaults (whisper-large-v3 + Llama-3.1-8B, "Qformer6L").

    `taps` index the list of encoder hidden states handed to the connector. With HF-style
    `hidden_states` (index 0 = embeddings) DeSTA's 0-based block indices [7, 15, 23, 31] are
    (8, 16, 24, 32). DeSTA taps *raw block outputs*: HF Whisper's last `hidden_states` entry is after the
    final LayerNorm, so the encoder must expose the pre-LN output of the last block for tap 32.
    """

    taps: tuple[int, ...] = (8, 16, 24, 32)
    n_queries: int = 64
    hidden: int = 1280          # BERT hidden_size (= Whisper d_model in DeSTA)
    heads: int = 20
    intermediate: int = 3072
    layers: int = 6
    enc_dim: int = 1280         # encoder width; cross-attention k/v map enc_dim -> hidden
    llm_dim: int = 4096
    layer_norm_eps: float = 1e-12
    proj_norm_eps: float = 1e-5  # torch nn.LayerNorm default, the LN before the LLM projection
    dropout: float = 0.1         # BERT hidden_dropout_prob
    attention_dropout: float = 0.1
    query_init_std: float = 1.0  # torch.randn in DeSTA
    proj_norm: str = "layer"     # the norm before the LLM projection: layer (DeSTA) | batch (per query and
                                 # channel over the clips of a batch, ours: see QFormerConnector)

    @property
    def n_taps(self) -> int:
        return len(self.taps)


class BertQFormerLayer(nnx.Module):
    """One BERT decoder layer with cross-attention (HF `BertLayer`, `is_decoder=True`), post-LN:

    h = LN(x + drop(SelfAttn(x))); h = LN(h + drop(CrossAttn(h, enc))); out = LN(h + drop(W2 gelu(W1 h))).
    x `[batch, queries, hidden]`, enc `[batch, frames, enc_dim]` -> `[batch, queries, hidden]`.
    """

    def __init__(self, cfg: QFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h, eps = cfg.hidden, cfg.layer_norm_eps
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = MultiHeadAttention(h, h, h, cfg.heads, dropout=cfg.attention_dropout, rngs=rngs, **kw)
        self.self_norm = LayerNorm(h, eps=eps, **kw)
        self.cross_attn = MultiHeadAttention(h, cfg.enc_dim, h, cfg.heads, dropout=cfg.attention_dropout,
                                             rngs=rngs, **kw)
        self.cross_norm = LayerNorm(h, eps=eps, **kw)
        self.intermediate = Linear(h, cfg.intermediate, axes=("conn_embed", "conn_mlp"), use_bias=True,
                                   rngs=rngs, **kw)
        self.output = Linear(cfg.intermediate, h, axes=("conn_mlp", "conn_embed"), use_bias=True, rngs=rngs, **kw)
        self.out_norm = LayerNorm(h, eps=eps, **kw)
        self.dropout = make_dropout(cfg.dropout, rngs)

    def __call__(self, x: jax.Array, enc: jax.Array, enc_mask: jax.Array | None = None) -> jax.Array:
        h = self.self_norm(x + apply_dropout(self.dropout, self.self_attn(x, x)))
        h = self.cross_norm(h + apply_dropout(self.dropout, self.cross_attn(h, enc, enc_mask)))
        y = self.output(gelu(self.intermediate(h)))
        return self.out_norm(h + apply_dropout(self.dropout, y))


class QFormerStack(nnx.Module):
    """The shared Q-Former (HF `BertEncoder` equivalent; no embedding LayerNorm: queries go in as is).

    queries `[batch, queries, hidden]`, enc `[batch, frames, enc_dim]`, enc_mask `[batch, frames]` (True =
    valid, optional; DeSTA passes none) -> `[batch, queries, hidden]`. `layer`: the layers, scanned (one
    `BertQFormerLayer` with parameters `[layers, ...]`) or unrolled (`models/stack.py`); `remat` per layer."""

    def __init__(self, cfg: QFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = True, remat: str = "none"):
        self.remat = check_remat(remat)
        self.layer = make_stack(lambda r: BertQFormerLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                cfg.layers, scan=scan_layers, rngs=rngs)

    def __call__(self, queries: jax.Array, enc: jax.Array, enc_mask: jax.Array | None = None) -> jax.Array:
        rows = ("batch", None, None)   # the loop carry starts from broadcast (replicated) queries: pin it
        enc = constrain(enc, rows)
        x, _ = run_stack(self.layer, lambda layer, h, _: (constrain(layer(h, enc, enc_mask), rows), None),
                         constrain(queries, rows), remat=self.remat)
        return x


class QFormerConnector(nnx.Module):
    """DeSTA2.5 connector. hidden_states: list of `[batch, frames, enc_dim]` (or stacked
    `[n_layers, batch, frames, enc_dim]`); `cfg.taps` picks the layers -> `[batch, n_queries, llm_dim]`.

    Each tap t gets its own queries `[n_queries, hidden]` and runs through the *same* stack (the taps are
    folded into the batch). Outputs are mixed per query with softmax(layer_weights `[n_queries, n_taps]`,
    init zeros) over taps, then LayerNorm and Linear to `llm_dim`.
    """

    def __init__(self, cfg: QFormerConfig = QFormerConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, scan_layers: bool = True, remat: str = "none"):
        if cfg.n_taps < 1 or cfg.n_queries < 1:
            raise ConfigError(f"QFormerConfig needs at least one tap and one query, got {cfg}")
        self.cfg, self.dtype = cfg, dtype
        init = nnx.initializers.normal(cfg.query_init_std)
        self.queries = param(init(rngs.params(), (cfg.n_taps, cfg.n_queries, cfg.hidden), param_dtype),
                             ("taps", "queries", "conn_embed"))
        self.layer_weights = param(jnp.zeros((cfg.n_queries, cfg.n_taps), param_dtype), ("queries", "taps"))
        self.qformer = QFormerStack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, scan_layers=scan_layers,
                                    remat=remat)
        if cfg.proj_norm == "batch":
            self.proj_norm = BatchNorm1d(cfg.n_queries * cfg.hidden, eps=cfg.proj_norm_eps, dtype=dtype,
                                         param_dtype=param_dtype)
        else:
            self.proj_norm = LayerNorm(cfg.hidden, eps=cfg.proj_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.proj = Linear(cfg.hidden, cfg.llm_dim, axes=("conn_embed", "conn_embed"), use_bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden_states: Sequence[jax.Array] | jax.Array,
                 enc_mask: jax.Array | None = None, clip_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        taps = select_taps(hidden_states, cfg.taps, "QFormerConnector")
        check_last_dim(taps[0], cfg.enc_dim, "QFormerConnector")
        b, t, e = taps[0].shape
        enc = jnp.stack(taps, axis=1).reshape(b * cfg.n_taps, t, e)
        q = jnp.broadcast_to(self.queries[...].astype(self.dtype)[None], (b, *self.queries.shape))
        q = q.reshape(b * cfg.n_taps, cfg.n_queries, cfg.hidden)
        mask = None if enc_mask is None else jnp.repeat(enc_mask, cfg.n_taps, axis=0)
        out = self.qformer(q, enc, mask).reshape(b, cfg.n_taps, cfg.n_queries, cfg.hidden)
        w = jax.nn.softmax(self.layer_weights[...].astype(jnp.float32), axis=-1)  # [queries, taps]
        mixed = jnp.einsum("btqh,qt->bqh", out.astype(jnp.float32), w).astype(self.dtype)
        if cfg.proj_norm == "batch":   # each (query, channel) centred over the batch's clips (`clip_mask` [b])
            normed = self.proj_norm(mixed.reshape(b, -1), clip_mask).reshape(mixed.shape).astype(self.dtype)
        else:
            normed = self.proj_norm(mixed)
        return self.proj(normed)

    @property
    def n_tokens(self) -> int:
        """Audio tokens per clip (fixed)."""
        return self.cfg.n_queries


# --------------------------------------------------------------------------------------------------
# Weight import from PyTorch (HF BertEncoder / DeSTA QformerConnector state dicts)

Target = tuple[nnx.Variable, bool, "int | None"]   # (our variable, transpose a torch Linear weight, layer slice)


def _bert_layer_table(prefix: str, layer: BertQFormerLayer, index: int | None) -> dict[str, Target]:
    """HF key -> (our variable, is a torch Linear weight that needs a transpose, slice of a stacked variable
    (`index`) or None)."""
    t: dict[str, Target] = {}

    def lin(key: str, mod: Linear):
        t[f"{key}.weight"] = (mod.kernel, True, index)
        t[f"{key}.bias"] = (mod.bias, False, index)

    def ln(key: str, mod: LayerNorm):
        t[f"{key}.weight"] = (mod.scale, False, index)
        t[f"{key}.bias"] = (mod.bias, False, index)

    for hf, attn, norm in (("attention", layer.self_attn, layer.self_norm),
                           ("crossattention", layer.cross_attn, layer.cross_norm)):
        for name in ("query", "key", "value"):
            lin(f"{prefix}{hf}.self.{name}", getattr(attn, name))
        lin(f"{prefix}{hf}.output.dense", attn.out)
        ln(f"{prefix}{hf}.output.LayerNorm", norm)
    lin(f"{prefix}intermediate.dense", layer.intermediate)
    lin(f"{prefix}output.dense", layer.output)
    ln(f"{prefix}output.LayerNorm", layer.out_norm)
    return t


def _weight_table(module: QFormerStack | QFormerConnector) -> dict[str, Target]:
    if isinstance(module, QFormerStack):
        table: dict[str, Target] = {}
        size = scanned_size(module.layer)
        for i in range(stack_length(module.layer)):
            layer, index = (module.layer, i) if size is not None else (module.layer[i], None)
            table.update(_bert_layer_table(f"layer.{i}.", layer, index))
        return table
    if isinstance(module, QFormerConnector):
        table = {f"qformer.{k}": v for k, v in _weight_table(module.qformer).items()}
        table["layer_weights"] = (module.layer_weights, False, None)
        table["proj.0.weight"] = (module.proj_norm.scale, False, None)
        table["proj.0.bias"] = (module.proj_norm.bias, False, None)
        table["proj.1.weight"] = (module.proj.kernel, True, None)
        table["proj.1.bias"] = (module.proj.bias, False, None)
        for i in range(module.cfg.n_taps):
            table[f"layer_prompts.{i}"] = (module.queries, False, i)  # `[1, queries, hidden]` -> queries[i]
        return table
    raise TypeError(f"expected QFormerStack or QFormerConnector, got {type(module).__name__}")


def load_bert_qformer_weights(module: QFormerStack | QFormerConnector, state_dict: Mapping[str, object],
                              *, prefix: str = "") -> None:
    """Copy PyTorch weights into `module`, strictly (in place).

    `QFormerStack` takes HF `BertEncoder` keys (`layer.{i}.attention.self.query.weight`, ...);
    `QFormerConnector` takes DeSTA `QformerConnector` keys (`layer_prompts.{i}` `[1, queries, hidden]`,
    `layer_weights`, `qformer.layer.{i}...`, `proj.0.*` (LayerNorm), `proj.1.*` (Linear)). `prefix` is
    stripped from every key first (e.g. "perception.connector."); keys without it are ignored. Torch
    Linear weights `[out, in]` are transposed to our `[in, out]`; layer i of a scanned stack is slice i of
    its stacked parameters. Values may be torch tensors or arrays. A missing, unexpected or mis-shaped key
    raises `WeightImportError` naming it.
    """
    if isinstance(module, QFormerConnector) and module.cfg.proj_norm != "layer":
        raise WeightImportError(f"DeSTA checkpoints hold a LayerNorm before the projection, this connector a "
                                f"{module.cfg.proj_norm} norm: build it with model.connector.norm=layer to import them")
    table = _weight_table(module)
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(set(table) - set(given))
    unexpected = sorted(set(given) - set(table))
    if missing:
        raise WeightImportError(f"Q-Former weights: missing key {prefix}{missing[0]} ({len(missing)} missing); "
                                "is this a BertEncoder / DeSTA connector state dict with the same layer count?")
    if unexpected:
        raise WeightImportError(f"Q-Former weights: unexpected key {prefix}{unexpected[0]} "
                                f"({len(unexpected)} unexpected); check the config (layers, taps) and prefix")
    sliced: dict[int, tuple[nnx.Variable, np.ndarray]] = {}   # id(var) -> (var, host copy being filled)
    for key, (var, transpose, index) in table.items():
        arr = _to_numpy(given[key])
        if key.startswith("layer_prompts."):   # DeSTA's `[1, queries, hidden]` per tap
            if arr.shape != (1, *var.shape[1:]):
                raise WeightImportError(f"Q-Former weights: {prefix}{key} has shape {arr.shape}, expected "
                                        f"{(1, *var.shape[1:])}")
            arr = arr[0]
        arr = arr.T if transpose else arr
        want = tuple(var.shape) if index is None else tuple(var.shape[1:])
        if arr.shape != want:
            raise WeightImportError(f"Q-Former weights: {prefix}{key} has shape {arr.shape} (after transpose: "
                                    f"{transpose}), expected {want}")
        if index is None:
            var.set_value(jnp.asarray(arr, dtype=var.dtype))
            continue
        if id(var) not in sliced:
            sliced[id(var)] = (var, np.array(var[...], dtype=np.float32))
        sliced[id(var)][1][index] = arr
    for var, host in sliced.values():
        var.set_value(jnp.asarray(host, dtype=var.dtype))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


DESTA_INTERMEDIATE = 3072   # DeSTA2.5's Q-Former FFN width (HF BertConfig's default intermediate_size)


class DestaConnector(Connector):
    """Registry kind `desta`: the DeSTA2.5 Q-Former on encoder 0's tapped states -> `[N, num_queries,
    llm_dim]` (a fixed count per clip, whatever its length)."""
    kind = "desta"
    layer_stack = True

    @classmethod
    def token_rule(cls, cc: ConnectorConfig, n_encoders: int) -> TokenRule:
        return TokenRule(fixed=cc.num_queries)

    @classmethod
    def resolve_config(cls, cc: ConnectorConfig, encoder_heads: Sequence[int]) -> ConnectorConfig:
        """DeSTA2.5's defaults (`modeling_desta25.py`: `BertConfig` with the audio encoder's attention heads and
        BERT's intermediate size): `num_heads` 0 -> encoder 0's heads, `intermediate` 0 -> 3072. Explicit
        values are kept."""
        heads = cc.num_heads or (int(encoder_heads[0]) if encoder_heads else 0)
        if heads <= 0:
            raise ConfigError("model.connector.num_heads=0 means the audio encoder's attention heads, but encoder 0 "
                              "has no single head count; set model.connector.num_heads")
        return dataclasses.replace(cc, num_heads=heads, intermediate=cc.intermediate or DESTA_INTERMEDIATE)

    def __init__(self, cc: ConnectorConfig, encoders: Sequence[EncoderInfo], llm_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, scan_layers: bool = True, remat: str = "none"):
        enc = encoders[0]
        hidden = cc.hidden or enc.dim
        if cc.num_heads <= 0:
            raise ConfigError(f"model.connector.num_heads={cc.num_heads}: 0 (the encoder's heads) must be resolved "
                              "first (DestaConnector.resolve_config; build_alm does it) or set explicitly")
        qcfg = QFormerConfig(taps=enc.taps, n_queries=cc.num_queries, hidden=hidden, heads=cc.num_heads,
                             intermediate=cc.intermediate or DESTA_INTERMEDIATE, layers=cc.num_layers, enc_dim=enc.dim,
                             llm_dim=llm_dim, dropout=cc.dropout, attention_dropout=cc.dropout, proj_norm=cc.norm)
        self.encoder_taps = (enc.taps,)
        self.net = QFormerConnector(qcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, scan_layers=scan_layers,
                                    remat=remat)

    def __call__(self, states: Sequence[Sequence[jax.Array]], audio_samples: jax.Array) -> jax.Array:
        return self.net(states[0], clip_mask=audio_samples > 0)

    def output_projection(self) -> Linear:
        return self.net.proj
