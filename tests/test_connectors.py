"""Connectors: parity against the PyTorch modules they reproduce (same weights, float32), token counts,
masking, gradient flow, and error messages."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.models.connectors import (
    AlarmAdapter, AlarmAdapterConfig, AudioBoundary, ClipCapMapper, ClipCapMapperConfig, CrossAttentionFusion,
    CrossAttentionFusionConfig, IdentityAdapter, IdentityAdapterConfig, MLPAdapter, MLPAdapterConfig,
    MultiHeadAttention, Perceiver, PerceiverConfig, PerceiverFusion, PerceiverFusionConfig, PreNormDecoderLayer,
    QFormerConfig, QFormerConnector, QFormerStack, SumFusion, load_bert_qformer_weights)
from alm_jax.sharding import LOGICAL_AXES
from alm_jax.testing.torch_desta import DestaConnector, bert_qformer

TOL = 1e-4
torch.manual_seed(0)

QCFG = QFormerConfig(taps=(1, 3, 4), n_queries=4, hidden=32, heads=4, intermediate=64, layers=2, enc_dim=32,
                     llm_dim=24, dropout=0.0, attention_dropout=0.0)


def _bert(impl: str = "eager", layers: int = 2) -> BertEncoder:
    # non-trivial LayerNorm affine params, so a swapped scale/bias would show
    return bert_qformer(32, 4, 64, layers, attn_implementation=impl, layernorm_noise=0.1).eval()


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


FAST = {"xla_backend_optimization_level": 0}  # tiny graphs: compile time dominates, skip LLVM opts


def _run(model, *args):
    """model(*args) under one jit (state updates such as BatchNorm statistics are written back)."""
    graphdef, state = nnx.split(model)

    def fwd(state, *args):
        m = nnx.merge(graphdef, state)
        return m(*args), nnx.state(m)

    out, state = jax.jit(fwd).lower(state, *args).compile(FAST)(state, *args)
    nnx.update(model, state)
    return out


# --------------------------------------------------------------------------------------------------
# DeSTA Q-Former

@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_qformer_stack_matches_hf_bert_encoder_eager(scan):
    ref = _bert("eager")
    ours = QFormerStack(QCFG, rngs=nnx.Rngs(0), scan_layers=scan)
    assert (ours.layer.intermediate.kernel.shape == (2, 32, 64)) if scan else len(ours.layer) == 2
    load_bert_qformer_weights(ours, ref.state_dict())
    q = np.random.default_rng(0).normal(size=(2, 4, 32)).astype(np.float32)
    enc = np.random.default_rng(1).normal(size=(2, 11, 32)).astype(np.float32)
    want = _np(ref(_t(q), encoder_hidden_states=_t(enc)).last_hidden_state)
    got = _run(ours, jnp.asarray(q), jnp.asarray(enc))
    assert _maxdiff(got, want) <= TOL


def test_hf_sdpa_without_mask_is_causal_and_eager_is_not():
    """The pitfall (DeSTA issue #8): same weights, no mask; SDPA makes the query self-attention causal.
    Our stack reproduces eager (bidirectional)."""
    eager = _bert("eager")
    sdpa = _bert("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    q, enc = torch.randn(1, 4, 32), torch.randn(1, 9, 32)
    out_eager = eager(q, encoder_hidden_states=enc).last_hidden_state
    out_sdpa = sdpa(q, encoder_hidden_states=enc).last_hidden_state
    assert _maxdiff(_np(out_eager), _np(out_sdpa)) > 1e-2
    # causal: query 0 sees only itself, i.e. equals eager on the first query alone
    alone = eager(q[:, :1], encoder_hidden_states=enc).last_hidden_state
    assert _maxdiff(_np(out_sdpa[:, :1]), _np(alone)) <= 1e-5
    # DeSTA's own construction (`BertEncoder(BertConfig())`, implementation None) resolves to eager
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                     is_decoder=True, add_cross_attention=True, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    assert cfg._attn_implementation is None
    plain = BertEncoder(cfg).eval()
    plain.load_state_dict(eager.state_dict())
    assert _maxdiff(_np(plain(q, encoder_hidden_states=enc).last_hidden_state), _np(out_eager)) <= 1e-6


def test_qformer_connector_matches_desta_reference_and_imports_its_keys():
    ref = DestaConnector(n_taps=QCFG.n_taps, n_queries=QCFG.n_queries, hidden=QCFG.hidden, heads=QCFG.heads,
                         intermediate=QCFG.intermediate, layers=QCFG.layers, llm_dim=QCFG.llm_dim,
                         random_layer_weights=True, layernorm_noise=0.1).eval()
    with torch.no_grad():
        ref.proj[0].weight.add_(0.1 * torch.randn(32))
    ours = QFormerConnector(QCFG, rngs=nnx.Rngs(0))
    sd = {f"perception.connector.{k}": v for k, v in ref.state_dict().items()}
    sd["llm.unrelated.weight"] = torch.zeros(1)  # outside the prefix: ignored
    load_bert_qformer_weights(ours, sd, prefix="perception.connector.")
    rng = np.random.default_rng(2)
    hidden = [rng.normal(size=(3, 13, 32)).astype(np.float32) for _ in range(5)]
    want = _np(ref([_t(hidden[i]) for i in QCFG.taps]))
    got = _run(ours, [jnp.asarray(h) for h in hidden])
    assert got.shape == (3, QCFG.n_queries, QCFG.llm_dim)
    assert _maxdiff(got, want) <= TOL
    # a stacked [n_layers, batch, frames, dim] array works the same
    assert _maxdiff(_run(ours, jnp.asarray(np.stack(hidden))), got) <= 1e-6


def test_qformer_weight_import_is_strict():
    ref = _bert("eager")
    sd = dict(ref.state_dict())
    ours = QFormerStack(QCFG, rngs=nnx.Rngs(0))
    missing = {k: v for k, v in sd.items() if k != "layer.1.output.dense.bias"}
    with pytest.raises(WeightImportError, match=r"layer\.1\.output\.dense\.bias"):
        load_bert_qformer_weights(ours, missing)
    with pytest.raises(WeightImportError, match=r"layer\.2\.extra"):
        load_bert_qformer_weights(ours, {**sd, "layer.2.extra": torch.zeros(1)})
    bad = dict(sd)
    bad["layer.0.intermediate.dense.weight"] = torch.zeros(64, 31)
    with pytest.raises(WeightImportError, match=r"layer\.0\.intermediate\.dense\.weight"):
        load_bert_qformer_weights(ours, bad)


def test_qformer_token_count_and_masking():
    """A fixed n_queries tokens per clip, whatever the frame count; masked frames change nothing."""
    m = QFormerConnector(QCFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    for t in (1, 30):
        hs = [jnp.asarray(rng.normal(size=(2, t, 32)), jnp.float32) for _ in range(5)]
        assert _run(m, hs).shape == (2, 4, 24)
    hs = [jnp.asarray(rng.normal(size=(2, 10, 32)), jnp.float32) for _ in range(5)]
    junk = [jnp.concatenate([h, 50.0 * jnp.ones((2, 6, 32))], axis=1) for h in hs]
    mask = jnp.arange(16)[None, :] < jnp.array([[10], [7]])   # row 1: frames 7.. are padding too
    out = _run(m, junk, mask)
    assert _maxdiff(out[0], _run(m, [h[:1] for h in hs])[0]) <= 1e-5
    assert _maxdiff(out[1], _run(m, [h[1:, :7] for h in hs])[0]) <= 1e-5


def test_qformer_rejects_bad_taps_and_widths():
    m = QFormerConnector(QCFG, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"out of range"):
        m([jnp.zeros((1, 5, 32))] * 3)
    with pytest.raises(ConfigError, match=r"expected feature size 32"):
        m([jnp.zeros((1, 5, 16))] * 5)


# --------------------------------------------------------------------------------------------------
# ALARM adapters

ACFG = AlarmAdapterConfig(layers=(1, 3), enc_dim=12, hidden=8, conv_dim=16, llm_dim=20)


class _TorchAlarmAdapter(torch.nn.Module):
    """ALARM DownsamplerConformer adapter (conformer off, depth 1) + layer average + llm_proj."""

    def __init__(self, cfg: AlarmAdapterConfig):
        super().__init__()
        c = cfg
        self.w = torch.nn.Parameter(torch.randn(len(c.layers)))
        self.input_proj = torch.nn.Linear(c.enc_dim, c.hidden)
        self.conv1 = torch.nn.Conv1d(c.hidden, c.conv_dim, 3, stride=1, padding=1)
        self.conv2 = torch.nn.Conv1d(c.conv_dim, c.hidden, 4, stride=2, padding=1)
        if c.norm == "batch":
            self.n1, self.n2 = torch.nn.BatchNorm1d(c.conv_dim), torch.nn.BatchNorm1d(c.hidden)
        else:
            self.n1, self.n2 = torch.nn.LayerNorm(c.conv_dim), torch.nn.LayerNorm(c.hidden)
        self.norm = c.norm
        self.llm_proj = torch.nn.Linear(c.hidden, c.llm_dim)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.add_(0.2 * torch.randn_like(n.weight))
                n.bias.add_(0.2 * torch.randn_like(n.bias))

    def _norm(self, n, x):  # x [b, c, t]
        return n(x) if self.norm == "batch" else n(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, layers):
        w = torch.softmax(self.w, 0)
        x = sum(wi * li for wi, li in zip(w, layers))
        x = self.input_proj(x)
        if x.shape[1] % 2:
            x = torch.nn.functional.pad(x, (0, 0, 0, 1))
        x = x.transpose(1, 2)
        x = self._norm(self.n1, torch.nn.functional.gelu(self.conv1(x)))
        x = self._norm(self.n2, torch.nn.functional.gelu(self.conv2(x)))
        return self.llm_proj(x.transpose(1, 2))


def _copy_alarm(ours: AlarmAdapter, ref: _TorchAlarmAdapter):
    ours.layer_average.weights.set_value(jnp.asarray(_np(ref.w)))
    for mine, theirs in ((ours.input_proj, ref.input_proj), (ours.llm_proj, ref.llm_proj)):
        mine.kernel.set_value(jnp.asarray(_np(theirs.weight).T))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))
    for mine, theirs in ((ours.conv1, ref.conv1), (ours.conv2, ref.conv2)):
        mine.kernel.set_value(jnp.asarray(_np(theirs.weight).transpose(2, 1, 0)))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))
    for mine, theirs in ((ours.norm1, ref.n1), (ours.norm2, ref.n2)):
        mine.scale.set_value(jnp.asarray(_np(theirs.weight)))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))


@pytest.mark.parametrize("t", [7, 8])
def test_alarm_adapter_batchnorm_matches_torch_train_and_eval(t):
    ref = _TorchAlarmAdapter(ACFG)
    ours = AlarmAdapter(ACFG, rngs=nnx.Rngs(0))
    _copy_alarm(ours, ref)
    rng = np.random.default_rng(t)
    hs = [rng.normal(size=(3, t, 12)).astype(np.float32) for _ in range(4)]
    # training: batch statistics, running averages updated like torch (unbiased variance, momentum 0.1)
    ref.train()
    want = _np(ref([_t(hs[i]) for i in ACFG.layers]))
    got = _run(ours, [jnp.asarray(h) for h in hs])
    assert got.shape == (3, (t + 1) // 2, 20)
    assert _maxdiff(got, want) <= TOL
    for mine, theirs in ((ours.norm1, ref.n1), (ours.norm2, ref.n2)):
        assert _maxdiff(mine.mean[...], _np(theirs.running_mean)) <= 1e-5
        assert _maxdiff(mine.var[...], _np(theirs.running_var)) <= 1e-5
    # eval: running statistics, nothing updated
    ref.eval()
    ours.eval()
    before = np.asarray(ours.norm1.mean[...])
    hs2 = [rng.normal(size=(2, t, 12)).astype(np.float32) for _ in range(4)]
    want = _np(ref([_t(hs2[i]) for i in ACFG.layers]))
    got = _run(ours, [jnp.asarray(h) for h in hs2])
    assert _maxdiff(got, want) <= TOL
    np.testing.assert_array_equal(np.asarray(ours.norm1.mean[...]), before)


def test_alarm_adapter_layernorm_matches_torch():
    cfg = dataclasses.replace(ACFG, norm="layer")
    ref = _TorchAlarmAdapter(cfg).eval()
    ours = AlarmAdapter(cfg, rngs=nnx.Rngs(0))
    _copy_alarm(ours, ref)
    hs = [np.random.default_rng(5).normal(size=(2, 9, 12)).astype(np.float32) for _ in range(4)]
    want = _np(ref([_t(hs[i]) for i in cfg.layers]))
    assert _maxdiff(_run(ours, [jnp.asarray(h) for h in hs]), want) <= TOL
    assert not nnx.state(ours, nnx.BatchStat)  # no running statistics with LayerNorm


@pytest.mark.parametrize("t", [1, 2, 7, 8, 1500])
def test_alarm_adapter_gives_floor_half_tokens(t):
    m = AlarmAdapter(ACFG, rngs=nnx.Rngs(0))
    out = _run(m, [jnp.ones((2, t, 12))] * 4)
    assert out.shape == (2, -(-t // 2), 20)          # rows: the even-padded buffer halved
    assert AlarmAdapter.output_lengths(t) == t // 2  # tokens: ALARM's calc_length (the fusion keeps >= 1)


def test_mlp_and_identity_adapters_keep_the_frame_rate():
    rng = np.random.default_rng(6)
    hs = [jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32) for _ in range(4)]
    mlp = MLPAdapter(MLPAdapterConfig(layers=(0, 2), enc_dim=12, hidden=8, llm_dim=20), rngs=nnx.Rngs(0))
    assert _run(mlp, hs).shape == (2, 5, 20)
    ident = IdentityAdapter(IdentityAdapterConfig(layers=(1, 2), enc_dim=12), rngs=nnx.Rngs(0))
    # zero-initialized layer weights: a plain mean of the chosen layers
    assert _maxdiff(_run(ident, hs), (hs[1] + hs[2]) / 2) <= 1e-6
    proj = IdentityAdapter(IdentityAdapterConfig(layers=(3,), enc_dim=12, llm_dim=20), rngs=nnx.Rngs(0))
    assert _run(proj, hs).shape == (2, 5, 20)


def test_alarm_adapter_rejects_unknown_norm():
    with pytest.raises(ConfigError, match="norm"):
        AlarmAdapter(dataclasses.replace(ACFG, norm="group"), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------------
# Fusion

CACFG = CrossAttentionFusionConfig(llm_dim=20, d=16, heads=4, ffn=32, dropout=0.0, layers_per_stream=(1, 2))


def _copy_decoder_layer(ours: PreNormDecoderLayer, ref: torch.nn.TransformerDecoderLayer):
    d = ref.linear1.in_features
    for mine, theirs in ((ours.self_attn, ref.self_attn), (ours.cross_attn, ref.multihead_attn)):
        w, b = _np(theirs.in_proj_weight), _np(theirs.in_proj_bias)
        for i, name in enumerate(("query", "key", "value")):
            getattr(mine, name).kernel.set_value(jnp.asarray(w[i * d:(i + 1) * d].T))
            getattr(mine, name).bias.set_value(jnp.asarray(b[i * d:(i + 1) * d]))
        mine.out.kernel.set_value(jnp.asarray(_np(theirs.out_proj.weight).T))
        mine.out.bias.set_value(jnp.asarray(_np(theirs.out_proj.bias)))
    for mine, theirs in ((ours.linear1, ref.linear1), (ours.linear2, ref.linear2)):
        mine.kernel.set_value(jnp.asarray(_np(theirs.weight).T))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))
    for mine, theirs in ((ours.norm1, ref.norm1), (ours.norm2, ref.norm2), (ours.norm3, ref.norm3)):
        with torch.no_grad():
            theirs.weight.add_(0.1 * torch.randn_like(theirs.weight))
        mine.scale.set_value(jnp.asarray(_np(theirs.weight)))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))


def _torch_decoder_layer():
    return torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, activation=torch.nn.functional.gelu,
                                            norm_first=True, batch_first=True).eval()


def test_cross_attention_fusion_matches_torch_decoder_layers():
    fusion = CrossAttentionFusion(CACFG, rngs=nnx.Rngs(0))
    in_proj = [torch.nn.Linear(20, 16) for _ in range(3)]
    layers = [[_torch_decoder_layer()], [_torch_decoder_layer(), _torch_decoder_layer()]]
    out_proj = torch.nn.Linear(16, 20)
    for mine, theirs in [*zip(fusion.in_proj, in_proj), (fusion.out_proj, out_proj)]:
        mine.kernel.set_value(jnp.asarray(_np(theirs.weight).T))
        mine.bias.set_value(jnp.asarray(_np(theirs.bias)))
    for mine_stream, their_stream in zip(fusion.decoders, layers):
        for mine, theirs in zip(mine_stream, their_stream):
            _copy_decoder_layer(mine, theirs)
    rng = np.random.default_rng(7)
    main = rng.normal(size=(3, 6, 20)).astype(np.float32)
    conds = [rng.normal(size=(3, 9, 20)).astype(np.float32), rng.normal(size=(3, 4, 20)).astype(np.float32)]
    # row 2: no valid main frame and no valid key anywhere (ALARM-CA's clip with 0 main-stream tokens)
    main_len, cond_len = np.array([6, 4, 0]), [np.array([9, 5, 0]), np.array([2, 4, 0])]
    valid = lambda n, t: np.arange(t)[None, :] < n[:, None]  # noqa: E731
    x = in_proj[0](_t(main))
    for i, (c, stream) in enumerate(zip(conds, layers)):
        mem = in_proj[i + 1](_t(c))
        for layer in stream:
            x = layer(x, mem, tgt_key_padding_mask=torch.from_numpy(~valid(main_len, 6)),
                      memory_key_padding_mask=torch.from_numpy(~valid(cond_len[i], c.shape[1])))
    want = _np(out_proj(x))
    got = _run(fusion, jnp.asarray(main), [jnp.asarray(c) for c in conds], jnp.asarray(valid(main_len, 6)),
               [jnp.asarray(valid(n, c.shape[1])) for n, c in zip(cond_len, conds)])
    assert got.shape == main.shape  # CA keeps the main stream's length
    ok = valid(main_len, 6)
    ok[2] = True                    # every row of the fully masked clip: torch's zero attention context
    assert not np.isnan(want).any()
    assert _maxdiff(np.asarray(got)[ok], want[ok]) <= TOL


@pytest.mark.parametrize("fully_masked", ["uniform", "zero"])
def test_attention_row_with_every_key_masked(fully_masked):
    """A batch row whose mask allows no key: "uniform" averages all values (padding included), "zero" gives a
    zero context (the out projection's bias, torch MHA / SDPA); rows with a valid key are the same either way."""
    attn = MultiHeadAttention(6, 5, 8, 2, fully_masked=fully_masked, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    q, kv = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
    mask = jnp.asarray([[True, True, False, False], [False] * 4])
    got = np.asarray(attn(q, kv, mask))
    ctx = attn.value(kv[1]).mean(0) if fully_masked == "uniform" else jnp.zeros(8)
    assert _maxdiff(got[1], np.broadcast_to(np.asarray(attn.out(ctx)), (3, 6))) <= 1e-5
    other = MultiHeadAttention(6, 5, 8, 2, fully_masked={"uniform": "zero", "zero": "uniform"}[fully_masked],
                               rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(other(q, kv, mask))[0], got[0])
    with pytest.raises(ConfigError, match="fully_masked='nan'"):
        MultiHeadAttention(6, 5, 8, 2, fully_masked="nan", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("t_main,t_cond", [(1, 7), (25, 3)])
def test_cross_attention_fusion_keeps_main_length(t_main, t_cond):
    f = CrossAttentionFusion(CACFG, rngs=nnx.Rngs(0))
    out = _run(f, jnp.ones((2, t_main, 20)), [jnp.ones((2, t_cond, 20)), jnp.ones((2, t_cond + 1, 20))])
    assert out.shape == (2, t_main, 20)
    with pytest.raises(ConfigError, match="2 conditional streams"):
        f(jnp.ones((2, t_main, 20)), [jnp.ones((2, t_cond, 20))])


def _pcfg(cond_dims):
    return PerceiverFusionConfig(llm_dim=20, cond_dims=cond_dims, perceiver=PerceiverConfig(
        n_latents=3, d=8, cross_heads=2, self_heads=2, self_layers_per_block=2, self_blocks=2))


@pytest.mark.parametrize("cond_dims", [(12,), (12, 6, 10)])
def test_perceiver_fusion_adds_latents_times_encoders_plus_two(cond_dims):
    f = PerceiverFusion(_pcfg(cond_dims), rngs=nnx.Rngs(0))
    conds = [jnp.ones((2, 5 + i, d)) for i, d in enumerate(cond_dims)]
    assert _run(f, jnp.ones((2, 1, 20)), conds).shape == (2, 1 + 3 * len(cond_dims) + 2, 20)
    main = jnp.arange(2 * 4 * 20, dtype=jnp.float32).reshape(2, 4, 20)
    out = _run(f, main, conds)
    assert out.shape == (2, 4 + 3 * len(cond_dims) + 2, 20)
    assert f.output_lengths(4) == out.shape[1] and f.n_extra_tokens == 3 * len(cond_dims) + 2
    np.testing.assert_array_equal(np.asarray(out[:, -4:]), np.asarray(main))       # main stream last
    np.testing.assert_array_equal(np.asarray(out[0, 0]), np.asarray(f.boundary.start[...]))
    np.testing.assert_array_equal(np.asarray(out[1, -5]), np.asarray(f.boundary.end[...]))


def test_perceiver_masked_frames_change_nothing():
    p = Perceiver(PerceiverConfig(kv_dim=6, n_latents=3, d=8, cross_heads=2, self_heads=2,
                                  self_layers_per_block=2, self_blocks=2), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 6)), jnp.float32)
    padded = jnp.concatenate([x, 100.0 * jnp.ones((2, 3, 6))], axis=1)
    mask = jnp.arange(8)[None] < jnp.array([[5], [2]])
    out = _run(p, padded, mask)
    assert _maxdiff(out[0], _run(p, x[:1])[0]) <= 1e-5
    assert _maxdiff(out[1], _run(p, x[1:, :2])[0]) <= 1e-5
    assert _maxdiff(_run(p, padded)[0], out[0]) > 1e-3  # unmasked, the padding does change the latents


def test_sum_fusion_and_boundary():
    a, b = jnp.ones((2, 4, 3)), 2 * jnp.ones((2, 4, 3))
    np.testing.assert_array_equal(np.asarray(SumFusion()([a, b])), 3 * np.ones((2, 4, 3)))
    with pytest.raises(ConfigError, match=r"different lengths \[4, 5\]"):
        SumFusion()([a, jnp.ones((2, 5, 3))])
    padded = SumFusion(pad_to_longest=True)([a, jnp.ones((2, 5, 3))])
    assert padded.shape == (2, 5, 3) and float(padded[0, 4, 0]) == 1.0
    bnd = AudioBoundary(3, rngs=nnx.Rngs(0))
    s, e = np.asarray(bnd.start[...]), np.asarray(bnd.end[...])
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
    out = np.asarray(bnd(x, jnp.array([2, 4])))
    assert out.shape == (2, 6, 3)
    np.testing.assert_array_equal(out[0], np.stack([s, *np.asarray(x[0, :2]), e, 0 * s, 0 * s]))
    np.testing.assert_array_equal(out[1], np.stack([s, *np.asarray(x[1]), e]))
    np.testing.assert_array_equal(np.asarray(bnd(x)), np.asarray(bnd(x, jnp.array([4, 4]))))  # full = none


# --------------------------------------------------------------------------------------------------
# MATS mapper

MCFG = ClipCapMapperConfig(clip_dim=8, d=16, clip_length=3, prefix_length=5, layers=2, heads=4, llm_dim=20)


def test_clipcap_mapper_shape_and_input_normalization():
    m = ClipCapMapper(MCFG, rngs=nnx.Rngs(0))
    z = jnp.asarray(np.random.default_rng(9).normal(size=(3, 8)), jnp.float32)
    out = _run(m, z)
    assert out.shape == (3, 5, 20)
    assert _maxdiff(_run(m, 7.0 * z), out) <= 1e-5  # the CLAP embedding is L2-normalized first
    with pytest.raises(ConfigError, match=r"\[batch, 8\]"):
        m(jnp.ones((3, 4)))


# --------------------------------------------------------------------------------------------------
# Gradients flow to every parameter

def _grad_check(model, forward):
    out = nnx.eval_shape(forward, model)
    r = jnp.asarray(np.random.default_rng(10).normal(size=out.shape), jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        rest = jax.tree.map(lambda x: x, rest)  # fresh Variables at this trace level (BatchNorm writes)
        return jnp.sum(forward(nnx.merge(graphdef, params, rest)) * r)

    grad_fn = jax.jit(jax.grad(loss)).lower(params, rest).compile(FAST)
    flat = jax.tree_util.tree_flatten_with_path(grad_fn(params, rest))[0]
    assert flat
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        if "key" in name and "bias" in name:
            # softmax is shift-invariant per query, so attention key biases get exactly no gradient
            assert np.max(np.abs(g)) <= 1e-5, name
        else:
            assert np.max(np.abs(g)) > 0, name


def test_every_connector_param_gets_a_finite_nonzero_gradient():
    rng = np.random.default_rng(11)
    hs = [jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32) for _ in range(4)]
    hq = [jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32) for _ in range(5)]
    main = jnp.asarray(rng.normal(size=(2, 5, 20)), jnp.float32)
    conds = [jnp.asarray(rng.normal(size=(2, 6, 20)), jnp.float32),
             jnp.asarray(rng.normal(size=(2, 4, 20)), jnp.float32)]
    r = nnx.Rngs(0)
    pcfg = _pcfg((20, 20))
    pcfg = dataclasses.replace(pcfg, perceiver=dataclasses.replace(pcfg.perceiver, self_layers_per_block=1))
    cases = [  # one layer per stack: every parameter kind once, short compiles
        (QFormerConnector(dataclasses.replace(QCFG, layers=1), rngs=r), lambda m: m(hq)),
        (AlarmAdapter(ACFG, rngs=r), lambda m: m(hs)),  # batch norm, training mode
        (AlarmAdapter(dataclasses.replace(ACFG, norm="layer"), rngs=r), lambda m: m(hs)),
        (MLPAdapter(MLPAdapterConfig(layers=(0, 2), enc_dim=12, hidden=8, llm_dim=20), rngs=r), lambda m: m(hs)),
        (IdentityAdapter(IdentityAdapterConfig(layers=(0, 2), enc_dim=12, llm_dim=20), rngs=r), lambda m: m(hs)),
        (CrossAttentionFusion(dataclasses.replace(CACFG, layers_per_stream=(1, 1)), rngs=r),
         lambda m: m(main, conds)),
        (PerceiverFusion(pcfg, rngs=r), lambda m: m(main, conds)),
        (ClipCapMapper(dataclasses.replace(MCFG, layers=1), rngs=r), lambda m: m(main[:, 0, :8])),
    ]
    for model, fwd in cases:
        _grad_check(model, fwd)


def test_connector_params_name_known_logical_axes():
    r = nnx.Rngs(0)
    models = [QFormerConnector(QCFG, rngs=r), AlarmAdapter(ACFG, rngs=r), CrossAttentionFusion(CACFG, rngs=r),
              PerceiverFusion(_pcfg((12,)), rngs=r), ClipCapMapper(MCFG, rngs=r),
              MLPAdapter(MLPAdapterConfig(layers=(0, 2), enc_dim=12, hidden=8, llm_dim=20), rngs=r),
              IdentityAdapter(IdentityAdapterConfig(layers=(0, 2), enc_dim=12, llm_dim=20), rngs=r)]
    kinds = set()
    for model in models:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == var.ndim and all(a in LOGICAL_AXES for a in axes), (path, axes)
            kinds.add(type(var))
    assert kinds == {nnx.Param, nnx.BatchStat}


def test_dropout_is_active_in_training_and_off_in_eval():
    layer = PreNormDecoderLayer(16, 4, 32, dropout=0.3, rngs=nnx.Rngs(0))
    x, mem = jnp.ones((2, 6, 16)), jnp.ones((2, 9, 16))
    assert _maxdiff(_run(layer, x, mem), _run(layer, x, mem)) > 1e-4
    layer.eval()
    assert _maxdiff(_run(layer, x, mem), _run(layer, x, mem)) == 0.0


def test_qformer_batch_norm_centres_each_query_channel_over_the_clips_of_a_batch():
    """`norm: batch` (ours): the projection's input is BatchNorm over the batch's clips per (query, channel), so
    a fresh projection (bias 0) gives tokens whose mean over the valid clips is 0 for every query and channel:
    the connector's constant part lives only in learned biases. Empty slots (`clip_mask` False) do not count in
    the statistics; eval mode normalizes with the running statistics, each clip alone."""
    cfg = dataclasses.replace(QCFG, proj_norm="batch")
    net = QFormerConnector(cfg, rngs=nnx.Rngs(0))
    assert float(np.abs(np.asarray(net.proj.bias[...])).max()) == 0.0
    rng = np.random.default_rng(0)
    states = [jnp.asarray(rng.standard_normal((6, 10, cfg.enc_dim)), jnp.float32) for _ in range(5)]
    valid = jnp.asarray([True, True, True, True, False, True])
    tokens = np.asarray(net(states, clip_mask=valid))                      # [6, queries, llm_dim]
    kept = tokens[np.asarray(valid)]
    np.testing.assert_allclose(kept.mean(0), 0.0, atol=1e-4)
    assert kept.std(0).mean() > 0.1                                       # the clips still differ
    layer = QFormerConnector(QCFG, rngs=nnx.Rngs(0))(states)               # DeSTA's LayerNorm: a shared part
    assert np.abs(np.asarray(layer).mean(0)).mean() > 0.1
    running = np.asarray(net.proj_norm.mean[...])
    assert np.abs(running).max() > 0                                       # training updated the statistics
    net.eval()
    alone = np.asarray(net([s[:1] for s in states]))
    together = np.asarray(net(states))
    np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(net.proj_norm.mean[...]), running)   # eval leaves them as they are
    with pytest.raises(WeightImportError, match="norm=layer"):                   # DeSTA's weights hold a LayerNorm
        load_bert_qformer_weights(net, {})
