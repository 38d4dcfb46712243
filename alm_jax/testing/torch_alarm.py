"""PyTorch reference of ALARM's audio path (Blinorot/ALARM `src/model/audio/`: adapters, fusion, and the
wrapper's token cropping and boundary embeddings), written from its description with the same module
structure, so a `state_dict` has ALARM's key names; the torch side of `tests/test_alarm_fidelity.py`.

    path = AlarmAudioPath(adapters=[whisper_adapter, w2v_adapter], fusion=AudioFusion("crossattention", ca),
                          llm_dim=20)
    clips = path(encoded, lengths)   # {name: [n_layers, B, T, D]}, {name: [B] valid frames} -> B x [S_i, llm_dim]

What it reproduces (`use_conformer: false`, `downsampler_depth: 1`, `pre_average: true`):
- `Adapter` (`BaseAudioAdapter` + `DownsamplerConformerAdapter` / `MLPAdapter` / `IdentityAdapter`): the
  chosen `hidden_states` cut to the batch's longest clip (`trim_padding_in_encoded_layers`), softmax layer
  average (`layer_fusion.layer_weights`, zeros), then Linear(enc -> dim) (Identity when equal) -> pad an odd
  length with a zero frame -> Conv1d(k3, p1) -> GELU -> Norm -> Conv1d(k4, s2, p1) -> GELU -> Norm
  (`adapter.downsampler.{0,1}.{0,2}`; norm BatchNorm1d or a LayerNorm over channels), or the MLP
  (`adapter.model.{0,2}`), or nothing; then `llm_proj`. `calc_length`: lengths // 2 (conv) or lengths.
- `AudioFusion`: every stream zero-padded to the longest (`pad_outputs`); "sum", "crossattention"
  (`CrossAttentionFusion`: `in_proj` per stream, `nn.TransformerDecoderLayer(norm_first, gelu, batch_first)`
  stacks per conditional stream in order, every key mask built from the main stream's lengths, `out_proj`)
  or "multiperceiver" (`MultiPerceiverFusion`: one perceiver-io `PerceiverEncoder` per conditional stream,
  masked by its own lengths, `out_proj`, `[cond_start, latents..., cond_end, main]`). `calc_length`: the
  fusion's own (Perceiver: main + latents + 2) or the max over streams.
- `AlarmAudioPath.forward` (`get_audio_embeddings` + `prepare_multimodal_inputs`): clip i keeps
  max(length_i, 1) rows, wrapped in `audio_start_emb` / `audio_end_emb`.

`load_alarm_state_dict(connector, state_dict, names)` copies such a state dict (ours or ALARM's own, with
`prefix="model."` for a checkpoint's keys) into an `alm_jax` ALARM connector.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------- adapters


class WeightedAverage(nn.Module):
    """Softmax-weighted sum over the first axis of `[n_layers, ...]`."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(n_layers))

    def forward(self, stacked):
        w = torch.softmax(self.layer_weights, dim=0)
        return (stacked * w.view(-1, *([1] * (stacked.ndim - 1)))).sum(dim=0)


class TransposeLayerNorm(nn.Module):
    """LayerNorm over the channels of `[B, C, T]`."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class Downsampler(nn.Module):
    """The conv downsampler: `[B, T, enc_dim]` -> `[B, ceil(T / 2), dim]`."""

    def __init__(self, enc_dim: int, dim: int, norm: str):
        super().__init__()
        self.input_proj = nn.Linear(enc_dim, dim) if enc_dim != dim else nn.Identity()
        norm_cls = nn.BatchNorm1d if norm == "batch" else TransposeLayerNorm
        self.downsampler = nn.Sequential(
            nn.Sequential(nn.Conv1d(dim, 2 * dim, 3, stride=1, padding=1), nn.GELU(), norm_cls(2 * dim)),
            nn.Sequential(nn.Conv1d(2 * dim, dim, 4, stride=2, padding=1), nn.GELU(), norm_cls(dim)))

    def forward(self, x):
        x = self.input_proj(x)
        if x.shape[1] % 2:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
        return self.downsampler(x.transpose(1, 2)).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, enc_dim: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(enc_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())

    def forward(self, x):
        return self.model(x)


class Adapter(nn.Module):
    """One encoder's adapter. kind: "downsampler" (with `norm` batch / layer), "mlp" or "identity".
    forward(encoded `[n_all_layers, B, T, enc_dim]`, lengths `[B]`) -> `[B, T', out]`."""

    def __init__(self, kind: str, layers: Sequence[int], enc_dim: int, dim: int, llm_dim: int, *,
                 norm: str = "batch", use_llm_proj: bool = True):
        super().__init__()
        self.kind = kind
        self.audio_encoder_layers = list(layers)
        if len(self.audio_encoder_layers) > 1:
            self.layer_fusion = WeightedAverage(len(self.audio_encoder_layers))
        if kind == "downsampler":
            self.adapter = Downsampler(enc_dim, dim, norm)
        elif kind == "mlp":
            self.adapter = MLP(enc_dim, dim)
        else:
            self.adapter = nn.Identity()
        self.use_llm_proj = use_llm_proj
        if use_llm_proj:
            self.llm_proj = nn.Linear(dim, llm_dim)

    def forward(self, encoded, lengths):
        x = encoded[self.audio_encoder_layers]
        x = x[:, :, : int(lengths.max())]
        x = self.layer_fusion(x) if len(self.audio_encoder_layers) > 1 else x[0]
        x = self.adapter(x)
        return self.llm_proj(x) if self.use_llm_proj else x

    def calc_length(self, lengths):
        return lengths // 2 if self.kind == "downsampler" else lengths


class AudioAdapter(nn.Module):
    """Adapters by encoder name (sorted, as ALARM stores them)."""

    def __init__(self, adapters: dict[str, Adapter]):
        super().__init__()
        self.adapters = nn.ModuleDict({k: adapters[k] for k in sorted(adapters)})

    def forward(self, encoded, lengths):
        return {k: a(encoded[k], lengths[k]) for k, a in self.adapters.items()}

    def calc_length(self, lengths):
        return {k: a.calc_length(lengths[k]) for k, a in self.adapters.items()}


# ---------------------------------------------------------------------------------------------- fusion


def padding_mask(x, lengths):
    """True = padding: `[B, T]` from `[B, T, D]` and `[B]`."""
    return torch.arange(x.shape[-2], device=x.device)[None, :] >= lengths[:, None]


class CrossAttentionFusion(nn.Module):
    def __init__(self, llm_dim: int, hidden_dim: int, ffn_dims: int, dropout: float, num_attention_heads: int,
                 num_hidden_layers: Sequence[int], main_encoder: str, conditional_encoders: Sequence[str]):
        super().__init__()
        self.main_encoder, self.conditional_encoders = main_encoder, list(conditional_encoders)
        self.condition_modules = nn.ModuleDict({
            name: nn.ModuleList([nn.TransformerDecoderLayer(hidden_dim, num_attention_heads, ffn_dims, dropout=dropout,
                                                            activation=F.gelu, norm_first=True, batch_first=True)
                                 for _ in range(k)])
            for name, k in zip(self.conditional_encoders, num_hidden_layers)})
        self.in_proj = nn.ModuleDict({name: nn.Linear(llm_dim, hidden_dim)
                                      for name in [main_encoder, *self.conditional_encoders]})
        self.out_proj = nn.Linear(hidden_dim, llm_dim)

    def forward(self, outputs, lengths):
        x = self.in_proj[self.main_encoder](outputs[self.main_encoder])
        mask = padding_mask(x, lengths[self.main_encoder])
        for name in self.conditional_encoders:
            mem = self.in_proj[name](outputs[name])
            mem_mask = padding_mask(mem, lengths[self.main_encoder])   # the main stream's lengths, as ALARM
            for layer in self.condition_modules[name]:
                x = layer(x, mem, tgt_key_padding_mask=mask, memory_key_padding_mask=mem_mask)
        return self.out_proj(x)


class Residual(nn.Module):
    def __init__(self, module: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.module = module
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, *args, **kwargs):
        return self.dropout(self.module(x, *args, **kwargs)) + x


class MultiHeadAttention(nn.Module):
    """perceiver-io attention: q scaled by head_dim ** -0.5, masked logits filled with -finfo.max."""

    def __init__(self, heads: int, q_dim: int, kv_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(q_dim, q_dim), nn.Linear(kv_dim, q_dim)
        self.v_proj = nn.Linear(kv_dim, q_dim)
        self.o_proj = nn.Linear(q_dim, q_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_q, x_kv, pad_mask=None):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = heads(self.q_proj(x_q)), heads(self.k_proj(x_kv)), heads(self.v_proj(x_kv))
        q = q * q.shape[-1] ** -0.5
        attn = torch.einsum("bhic,bhjc->bhij", q, k)
        if pad_mask is not None:
            attn = attn.masked_fill(pad_mask[:, None, None, :], -torch.finfo(attn.dtype).max)
        o = torch.einsum("bhij,bhjc->bhic", self.dropout(attn.softmax(-1)), v)
        return self.o_proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))


class CrossAttention(nn.Module):
    def __init__(self, heads: int, q_dim: int, kv_dim: int, dropout: float):
        super().__init__()
        self.q_norm, self.kv_norm = nn.LayerNorm(q_dim), nn.LayerNorm(kv_dim)
        self.attention = MultiHeadAttention(heads, q_dim, kv_dim, dropout)

    def forward(self, x_q, x_kv, pad_mask=None):
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv), pad_mask)


class SelfAttention(nn.Module):
    def __init__(self, heads: int, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(heads, dim, dim, dropout)

    def forward(self, x):
        h = self.norm(x)
        return self.attention(h, h)


def perceiver_mlp(dim: int, widening: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, widening * dim), nn.GELU(), nn.Linear(widening * dim, dim))


class CrossAttentionLayer(nn.Sequential):
    def __init__(self, heads, q_dim, kv_dim, widening, dropout):
        super().__init__(Residual(CrossAttention(heads, q_dim, kv_dim, dropout)),
                         Residual(perceiver_mlp(q_dim, widening)))

    def forward(self, x, x_kv, pad_mask=None):
        return self[1](self[0](x, x_kv, pad_mask))


class SelfAttentionLayer(nn.Sequential):
    def __init__(self, heads, dim, widening, dropout):
        super().__init__(Residual(SelfAttention(heads, dim, dropout)), Residual(perceiver_mlp(dim, widening)))

    def forward(self, x):
        return self[1](self[0](x))


class PerceiverEncoder(nn.Module):
    """perceiver-io's encoder: latents `latent_provider._query [n, d]`; block i (0-based) runs a cross-attention
    layer when i < num_cross_attention_layers, then its self-attention block; blocks 1.. reuse block 0's
    weights when `first_self_attention_block_shared` (else `self_attn_n`), likewise the cross layers."""

    def __init__(self, kv_dim: int, num_latents: int, num_latent_channels: int, num_cross_attention_heads: int = 4,
                 num_cross_attention_layers: int = 1, first_cross_attention_layer_shared: bool = False,
                 num_self_attention_heads: int = 4, num_self_attention_layers_per_block: int = 6,
                 num_self_attention_blocks: int = 1, first_self_attention_block_shared: bool = True,
                 widening_factor: int = 1, dropout: float = 0.0, init_scale: float = 0.02):
        super().__init__()
        d = num_latent_channels
        self.latent_provider = nn.Module()
        self.latent_provider._query = nn.Parameter(torch.empty(num_latents, d).normal_(0.0, init_scale))
        self.n_cross, self.n_blocks = num_cross_attention_layers, num_self_attention_blocks

        def cross():
            return CrossAttentionLayer(num_cross_attention_heads, d, kv_dim, widening_factor, dropout)

        def block():
            return nn.Sequential(*[SelfAttentionLayer(num_self_attention_heads, d, widening_factor, dropout)
                                   for _ in range(num_self_attention_layers_per_block)])

        self.cross_attn_1, self.self_attn_1 = cross(), block()
        if self.n_cross > 1 and not first_cross_attention_layer_shared:
            self.cross_attn_n = cross()
        if self.n_blocks > 1 and not first_self_attention_block_shared:
            self.self_attn_n = block()
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, init_scale)
                    m.bias.zero_()

    def forward(self, x, pad_mask=None):
        lat = self.latent_provider._query[None].expand(x.shape[0], -1, -1)
        cross_n = getattr(self, "cross_attn_n", self.cross_attn_1)
        block_n = getattr(self, "self_attn_n", self.self_attn_1)
        for i in range(self.n_blocks):
            if i < self.n_cross:
                lat = (self.cross_attn_1 if i == 0 else cross_n)(lat, x, pad_mask)
            lat = (self.self_attn_1 if i == 0 else block_n)(lat)
        return lat


class MultiPerceiverFusion(nn.Module):
    def __init__(self, llm_dim: int, main_encoder: str, conditional_encoders: Sequence[str],
                 conditional_embedding_dim: Sequence[int], num_latents: int, **perceiver_kw):
        super().__init__()
        self.main_encoder, self.conditional_encoders = main_encoder, list(conditional_encoders)
        self.total_num_latents = num_latents * len(self.conditional_encoders)
        d = perceiver_kw["num_latent_channels"]
        self.perceiver = nn.ModuleDict({name: PerceiverEncoder(k, num_latents, **perceiver_kw)
                                        for name, k in zip(self.conditional_encoders, conditional_embedding_dim)})
        self.out_proj = nn.ModuleDict({name: nn.Linear(d, llm_dim) for name in self.conditional_encoders})
        self.cond_start_emb = nn.Parameter(torch.randn(1, llm_dim))
        self.cond_end_emb = nn.Parameter(torch.randn(1, llm_dim))

    def forward(self, outputs, lengths):
        main = outputs[self.main_encoder]
        latents = [self.out_proj[n](self.perceiver[n](outputs[n], padding_mask(outputs[n], lengths[n])))
                   for n in self.conditional_encoders]
        b, d = main.shape[0], main.shape[2]
        start, end = self.cond_start_emb.expand(b, 1, d), self.cond_end_emb.expand(b, 1, d)
        return torch.cat([start, *latents, end, main], dim=1)

    def calc_length(self, lengths):
        return lengths[self.main_encoder] + self.total_num_latents + 2


class AudioFusion(nn.Module):
    """fusion_type "sum", "crossattention" (kwargs of `CrossAttentionFusion`) or "multiperceiver" (of
    `MultiPerceiverFusion`)."""

    def __init__(self, fusion_type: str = "sum", **kw):
        super().__init__()
        self.fusion_type = fusion_type
        self.fusion_model = {"sum": lambda: None, "crossattention": lambda: CrossAttentionFusion(**kw),
                             "multiperceiver": lambda: MultiPerceiverFusion(**kw)}[fusion_type]()

    def forward(self, outputs, lengths):
        t = max(o.shape[-2] for o in outputs.values())
        outputs = {k: F.pad(o, (0, 0, 0, t - o.shape[-2])) for k, o in outputs.items()}
        if self.fusion_model is None:
            return sum(outputs.values())
        return self.fusion_model(outputs, lengths)

    def calc_length(self, lengths):
        if hasattr(self.fusion_model, "calc_length"):
            return self.fusion_model.calc_length(lengths)
        return torch.stack(list(lengths.values()), dim=-1).max(dim=-1).values


class AlarmAudioPath(nn.Module):
    """adapters -> fusion -> per clip max(length, 1) rows wrapped in the learned start / end embeddings."""

    def __init__(self, adapters: dict[str, Adapter], fusion: AudioFusion, llm_dim: int):
        super().__init__()
        self.audio_adapter = AudioAdapter(adapters)
        self.audio_fusion = fusion
        self.audio_start_emb = nn.Parameter(torch.randn(1, llm_dim))
        self.audio_end_emb = nn.Parameter(torch.randn(1, llm_dim))

    def forward(self, encoded: dict, lengths: dict) -> list[torch.Tensor]:
        out = self.audio_adapter(encoded, lengths)
        lengths = self.audio_adapter.calc_length(lengths)
        out = self.audio_fusion(out, lengths)
        n = self.audio_fusion.calc_length(lengths).clamp_min(1)
        return [torch.cat([self.audio_start_emb, out[i, : int(n[i])], self.audio_end_emb]) for i in range(len(n))]


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Every parameter and BatchNorm statistic of `module` drawn at random (norm scales near 1, biases, layer
    weights and running statistics non-trivial), so a swapped or missed tensor shows in a parity test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + r.abs())
            elif t.ndim == 1 and name.endswith("weight"):      # norm scales (Linear / conv weights are >= 2-D)
                t.copy_(1.0 + scale * r)
            elif t.ndim == 1:                                    # biases, running means, layer weights
                t.copy_(scale * r if not name.endswith("layer_weights") else r)
            else:
                t.copy_(r / float(np.sqrt(np.prod(t.shape[1:]))))
    return module


# ---------------------------------------------------------------------------------------------- into alm_jax


def load_alarm_state_dict(connector, state_dict: dict, names: Sequence[str], prefix: str = "") -> None:
    """Copy an ALARM audio-path state dict (this module's `AlarmAudioPath`, or ALARM's own model with
    `prefix="model."`) into an `alm_jax` ALARM connector (`alarm`, `sum`, `alarm_ca`, `alarm_p`). `names[i]`:
    ALARM's encoder name of our stream i (e.g. ["whisper", "w2vbert"]); the CA fusion must list the conditional
    encoders in our stream order. Every tensor the connector needs must be there (a KeyError names it)."""
    import jax.numpy as jnp

    from alm_jax.models.connectors.alarm_adapter import AlarmAdapter, MaskedBatchNorm1d, MLPAdapter
    from alm_jax.models.connectors.fusion import CrossAttentionFusion, PerceiverFusion

    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def get(key):
        return np.asarray(sd[key].detach().cpu().numpy(), np.float32)

    def lin(mine, key, transpose=True):
        w = get(f"{key}.weight")
        mine.kernel.set_value(jnp.asarray(w.T if transpose else w))
        mine.bias.set_value(jnp.asarray(get(f"{key}.bias")))

    def norm(mine, key):
        if isinstance(mine, MaskedBatchNorm1d):
            mine.mean.set_value(jnp.asarray(get(f"{key}.running_mean")))
            mine.var.set_value(jnp.asarray(get(f"{key}.running_var")))
        else:
            key = f"{key}.norm"
        mine.scale.set_value(jnp.asarray(get(f"{key}.weight")))
        mine.bias.set_value(jnp.asarray(get(f"{key}.bias")))

    def conv(mine, key):
        mine.kernel.set_value(jnp.asarray(get(f"{key}.weight").transpose(2, 1, 0)))
        mine.bias.set_value(jnp.asarray(get(f"{key}.bias")))

    for adapter, name in zip(connector.adapters, names):
        a = f"audio_adapter.adapters.{name}"
        if adapter.layer_average.weights is not None:
            adapter.layer_average.weights.set_value(jnp.asarray(get(f"{a}.layer_fusion.layer_weights")))
        if isinstance(adapter, AlarmAdapter):
            if adapter.input_proj is not None:
                lin(adapter.input_proj, f"{a}.adapter.input_proj")
            conv(adapter.conv1, f"{a}.adapter.downsampler.0.0")
            norm(adapter.norm1, f"{a}.adapter.downsampler.0.2")
            conv(adapter.conv2, f"{a}.adapter.downsampler.1.0")
            norm(adapter.norm2, f"{a}.adapter.downsampler.1.2")
        elif isinstance(adapter, MLPAdapter):
            lin(adapter.fc1, f"{a}.adapter.model.0")
            lin(adapter.fc2, f"{a}.adapter.model.2")
        if adapter.llm_proj is not None:
            lin(adapter.llm_proj, f"{a}.llm_proj")
    connector.boundary.start.set_value(jnp.asarray(get("audio_start_emb")[0]))
    connector.boundary.end.set_value(jnp.asarray(get("audio_end_emb")[0]))

    fusion = getattr(connector, "fusion", None)
    f = "audio_fusion.fusion_model"
    if isinstance(fusion, CrossAttentionFusion):
        for i, name in enumerate(names):
            lin(fusion.in_proj[i], f"{f}.in_proj.{name}")
        lin(fusion.out_proj, f"{f}.out_proj")
        for stream, name in zip(fusion.decoders, names[1:]):
            for j, layer in enumerate(stream):
                _load_decoder_layer(layer, get, f"{f}.condition_modules.{name}.{j}")
    elif isinstance(fusion, PerceiverFusion):
        fusion.boundary.start.set_value(jnp.asarray(get(f"{f}.cond_start_emb")[0]))
        fusion.boundary.end.set_value(jnp.asarray(get(f"{f}.cond_end_emb")[0]))
        for p, proj, name in zip(fusion.perceivers, fusion.out_proj, names[1:]):
            lin(proj, f"{f}.out_proj.{name}")
            k = f"{f}.perceiver.{name}"
            p.latents.set_value(jnp.asarray(get(f"{k}.latent_provider._query")))
            _load_perceiver_cross(p.cross, lin, norm_ln(get), f"{k}.cross_attn_1")
            for j, layer in enumerate(p.block):
                _load_perceiver_self(layer, lin, norm_ln(get), f"{k}.self_attn_1.{j}")
            if p.cross_n is not None:
                _load_perceiver_cross(p.cross_n, lin, norm_ln(get), f"{k}.cross_attn_n")
            if p.block_n is not None:
                for j, layer in enumerate(p.block_n):
                    _load_perceiver_self(layer, lin, norm_ln(get), f"{k}.self_attn_n.{j}")


def norm_ln(get):
    import jax.numpy as jnp

    def load(mine, key):
        mine.scale.set_value(jnp.asarray(get(f"{key}.weight")))
        mine.bias.set_value(jnp.asarray(get(f"{key}.bias")))
    return load


def _load_attention(mine, lin, key):
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
        lin(getattr(mine, ours), f"{key}.{theirs}")


def _load_perceiver_mlp(mine, lin, ln, key):
    ln(mine.norm, f"{key}.0")
    lin(mine.fc1, f"{key}.1")
    lin(mine.fc2, f"{key}.3")


def _load_perceiver_cross(mine, lin, ln, key):
    ln(mine.q_norm, f"{key}.0.module.q_norm")
    ln(mine.kv_norm, f"{key}.0.module.kv_norm")
    _load_attention(mine.attn, lin, f"{key}.0.module.attention")
    _load_perceiver_mlp(mine.mlp, lin, ln, f"{key}.1.module")


def _load_perceiver_self(mine, lin, ln, key):
    ln(mine.norm, f"{key}.0.module.norm")
    _load_attention(mine.attn, lin, f"{key}.0.module.attention")
    _load_perceiver_mlp(mine.mlp, lin, ln, f"{key}.1.module")


def _load_decoder_layer(mine, get, key):
    """torch `nn.TransformerDecoderLayer` (fused in_proj) -> `PreNormDecoderLayer`."""
    import jax.numpy as jnp

    d = mine.linear1.kernel.shape[0]
    for ours, theirs in ((mine.self_attn, "self_attn"), (mine.cross_attn, "multihead_attn")):
        w, b = get(f"{key}.{theirs}.in_proj_weight"), get(f"{key}.{theirs}.in_proj_bias")
        for i, name in enumerate(("query", "key", "value")):
            getattr(ours, name).kernel.set_value(jnp.asarray(w[i * d:(i + 1) * d].T))
            getattr(ours, name).bias.set_value(jnp.asarray(b[i * d:(i + 1) * d]))
        ours.out.kernel.set_value(jnp.asarray(get(f"{key}.{theirs}.out_proj.weight").T))
        ours.out.bias.set_value(jnp.asarray(get(f"{key}.{theirs}.out_proj.bias")))
    for ours, theirs in ((mine.linear1, "linear1"), (mine.linear2, "linear2")):
        ours.kernel.set_value(jnp.asarray(get(f"{key}.{theirs}.weight").T))
        ours.bias.set_value(jnp.asarray(get(f"{key}.{theirs}.bias")))
    for ours, theirs in ((mine.norm1, "norm1"), (mine.norm2, "norm2"), (mine.norm3, "norm3")):
        ours.scale.set_value(jnp.asarray(get(f"{key}.{theirs}.weight")))
        ours.bias.set_value(jnp.asarray(get(f"{key}.{theirs}.bias")))
