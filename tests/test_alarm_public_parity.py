"""ALARM connectors against ALARM's OWN public torch modules (vendored in `tests/third_party/alarm/`, Blinorot/ALARM
commit 67c6776b, MIT) with the same weights, float32, tiny sizes.

The torch side is ALARM's code path itself: `AudioAdapter` (`DownsamplerConformerAdapter` with BatchNorm or
LayerNorm, `MLPAdapter`, `IdentityAdapter`), `AudioFusion` (sum, `CrossAttentionFusion`, `MultiPerceiverFusion`)
and `LLMAudioWrapperForCausalLM.get_audio_embeddings` / `prepare_multimodal_inputs` (trim to the batch's longest
clip, `calc_length`, `clamp_min(1)`, crop, start / end embeddings) driven through a stand-in for its
`LLMAudioWrapperModel` whose encoder returns given hidden states. Weights go into ours with
`alm_jax.testing.torch_alarm.load_alarm_state_dict` (ALARM's real state-dict keys), which must read every tensor.

Compared (<= 1e-4): each clip's rows (boundary included) and its token count; BatchNorm running statistics after
training-mode forwards, then eval mode; per-stream adapter lengths and the fused length against ALARM's
`calc_length`s; a CA clip with 0 main-stream tokens (torch's zero attention context for a row with every key
masked: our decoder layers' `fully_masked="zero"`); the samples -> encoder-frames rules and the W2V-BERT features
against ALARM's feature extractors (last four tests). Frames are counted under ALARM's input convention
(`EncoderConfig.input_convention: alarm`, as ALARM's configs set it: Whisper counts the HF attention mask,
W2V-BERT's waveform is zero-padded by 160 samples on each side); those tests also pin the native rules.
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from alm_jax.audio.fbank import ALARM_EDGE_PAD, w2v_bert_features, w2v_bert_features_numpy
from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.models.connectors import CONNECTORS, EncoderInfo, MultiHeadAttention, connector_class, token_rule_for
from alm_jax.testing.torch_alarm import load_alarm_state_dict, randomize_
from test_alarm_fidelity import run   # jitted forward, BatchNorm statistics written back
from third_party.alarm.audio import AudioAdapter, AudioFusion, AudioPostprocessing   # ALARM's own code (tests/)
from third_party.alarm.llm_audio_wrapper import LLMAudioWrapperForCausalLM

TOL = 1e-4
LLM, ADAPTER = 20, 8
FAST = {"xla_backend_optimization_level": 0}
TAPS = {"whisper": (1, 3), "w2vbert": (0, 2, 3), "muq": (2,)}
DIMS = {"whisper": 12, "w2vbert": 10, "muq": 6}
KIND = {"whisper": "whisper", "w2vbert": "w2v_bert", "muq": "whisper"}   # our frame rule of each stream
ALARM = "alarm"   # EncoderConfig.input_convention of ALARM's configs: its feature extractors' frame counts
MAX_DIFF: dict[str, float] = {}   # test -> largest |ours - ALARM| seen (printed with -s)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread_and_report(one_torch_thread):
    yield
    print("\nmax |ours - ALARM| per comparison:", {k: f"{v:.2e}" for k, v in sorted(MAX_DIFF.items())})


# ------------------------------------------------------------------------------------------- ALARM's side


def conv_adapter(name, norm):
    """ALARM's `downsampler_conformer` adapter as its configs set it (whisper_batch.yaml / w2vbert.yaml)."""
    return dict(encoder_name=name, adapter_name="downsampler_conformer",
                layer_fusion_config={"layer_fusion_type": "weighted_average"},
                audio_encoder_layers=list(TAPS[name]), norm_type=norm, pre_average=True, downsampler_depth=1,
                use_conformer=False, encoder_embedding_dim=DIMS[name], adapter_embedding_dim=ADAPTER,
                llm_embedding_dim=LLM)


def mlp_adapter(name):
    """muq.yaml's `mlp` adapter."""
    return dict(encoder_name=name, adapter_name="mlp", layer_fusion_config={"layer_fusion_type": "weighted_average"},
                audio_encoder_layers=list(TAPS[name]), pre_average=True, encoder_embedding_dim=DIMS[name],
                hidden_dim=ADAPTER, adapter_embedding_dim=ADAPTER, llm_embedding_dim=LLM)


def identity_adapter(name):
    """alarm_p.yaml's conditional `identity` adapters (no projection)."""
    return dict(encoder_name=name, adapter_name="identity",
                layer_fusion_config={"layer_fusion_type": "weighted_average"},
                audio_encoder_layers=list(TAPS[name]), pre_average=True, adapter_embedding_dim=ADAPTER,
                llm_embedding_dim=LLM, use_llm_proj=False)


class _Encoder(nn.Module):
    """Stand-in for ALARM's `AudioEncoder`: returns the given stacked hidden states `{name: [n, B, T, D]}`; the
    lengths given are already encoder frames."""

    def forward(self, input_features, attention_mask):
        return input_features

    def calc_length(self, lengths):
        return lengths


class _Model(nn.Module):
    """What `get_audio_embeddings` / `prepare_multimodal_inputs` read of ALARM's `LLMAudioWrapperModel`
    (llm_audio_wrapper.py:9-24), built the same way, plus an `embed_tokens` for the (empty) text."""

    def __init__(self, adapter_configs, fusion_config):
        super().__init__()
        self.audio_encoder = _Encoder()
        self.audio_adapter = AudioAdapter(adapter_configs=adapter_configs)
        self.audio_fusion = AudioFusion(fusion_config)
        self.audio_postprocessing = AudioPostprocessing({"postprocessing_type": "identity"})
        self.audio_start_emb = nn.Parameter(torch.randn((1, LLM)))
        self.audio_end_emb = nn.Parameter(torch.randn((1, LLM)))
        self.embed_tokens = nn.Embedding(1, LLM)


class Alarm(LLMAudioWrapperForCausalLM):
    def __init__(self, adapter_configs, fusion_config, seed):
        torch.manual_seed(seed)
        self.model = randomize_(_Model(adapter_configs, fusion_config), seed=seed)
        self.set_tokenizer_arguments(types.SimpleNamespace(pad_token_id=0, model_max_length=10**6))

    def get_model(self):
        return self.model

    def get_head(self):
        return None

    def get_config(self):
        return types.SimpleNamespace(use_explicit_audio_tokens=False)

    def __call__(self, encoded, lengths):
        """ALARM's per-clip audio block `[audio_start, audio_embeds[i], audio_end]` (empty prompt text)."""
        empty = [torch.zeros(0, dtype=torch.long)] * len(next(iter(lengths.values())))
        with torch.no_grad():
            embeds, _, _ = self.prepare_multimodal_inputs(None, empty, empty, None, encoded, None, lengths,
                                                          return_batch=False)
        return embeds

    def bn_stats(self, name):
        d = self.model.audio_adapter.adapters[name].adapter.downsampler
        return [(d[k][2].running_mean.numpy(), d[k][2].running_var.numpy()) for k in (0, 1)]


# ------------------------------------------------------------------------------------------- ours


def build(cc: ConnectorConfig, names):
    infos = [EncoderInfo(dim=DIMS[n], taps=TAPS[n], n_entries=4, frames=KIND[n], convention=ALARM) for n in names]
    rule = token_rule_for(connector_class(cc.kind), cc,
                          [EncoderConfig(kind=KIND[n], input_convention=ALARM) for n in names])
    # abstract parameters (no init compute): `load` must then give every one of them ALARM's value
    return nnx.eval_shape(lambda: CONNECTORS[cc.kind](cc, infos, LLM, rngs=nnx.Rngs(0))), rule


def load(conn, ref: Alarm, names):
    """ALARM's state dict into ours; every tensor ALARM has (but the stand-in's embed_tokens) must be read."""
    seen = set()

    class Tracked:
        def __init__(self, key, t):
            self.key, self.t = key, t

        def detach(self):
            seen.add(self.key)
            return self.t.detach()

    sd = ref.model.state_dict()
    load_alarm_state_dict(conn, {k: Tracked(k, v) for k, v in sd.items()}, names)
    unread = {k for k in sd if not k.endswith("num_batches_tracked") and k != "embed_tokens.weight"} - seen
    assert not unread, f"ALARM tensors our connector does not read: {sorted(unread)}"


def bn_stats(conn):
    return [(np.asarray(n.mean[...]), np.asarray(n.var[...])) for a in conn.adapters
            for n in (getattr(a, "norm1", None), getattr(a, "norm2", None)) if hasattr(n, "mean")]


# ------------------------------------------------------------------------------------------- shared


def samples_for(frames: int) -> int:
    """Valid 16 kHz samples giving `frames` Whisper encoder frames (either convention: not a multiple of 160)."""
    return 320 * frames - 100


def inputs(names, samples, buffer=16, seed=0):
    """Random hidden states (4 entries per encoder, `buffer` rows, random past each clip too: a padded batch)
    -> (ours: list per stream, ALARM's: {name: [4, B, T, D]}, ALARM's lengths {name: [B] encoder frames})."""
    rng = np.random.default_rng(seed)
    ours, theirs, lengths = [], {}, {}
    for n in names:
        h = rng.normal(size=(4, len(samples), buffer, DIMS[n])).astype(np.float32)
        ours.append([jnp.asarray(x) for x in h])
        theirs[n] = torch.from_numpy(h)
        lengths[n] = torch.from_numpy(np.asarray(encoder_frames(np.asarray(samples), KIND[n], ALARM), np.int64))
    return ours, theirs, lengths


def compare(key, got, want, rule, samples):
    """Per clip: ALARM's rows (boundary included) = ours, zeros after; our token rule counts ALARM's rows."""
    worst = 0.0
    for i, (w, n) in enumerate(zip(want, samples)):
        w = w.numpy()
        assert len(w) == rule(int(n)), (i, len(w), rule(int(n)))
        diff = float(np.max(np.abs(got[i, :len(w)] - w)))
        assert diff <= TOL, (i, diff)
        assert not np.any(got[i, len(w):])
        worst = max(worst, diff)
    MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), worst)


def compare_stats(key, ours, theirs):
    for (m, v), (tm, tv) in zip(ours, theirs, strict=True):
        diff = max(float(np.max(np.abs(m - tm))), float(np.max(np.abs(v - tv))))
        assert diff <= 1e-5, diff
        MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), diff)


def compare_lengths(conn, ref: Alarm, names, samples, lengths):
    """Per-stream adapter lengths and the fused length (before clamp and boundary) = ALARM's `calc_length`s."""
    theirs = ref.model.audio_adapter.calc_length(lengths)
    ours = [np.asarray(conn.adapted(jnp.asarray(samples), i)) for i in range(len(names))]
    for i, n in enumerate(names):
        np.testing.assert_array_equal(ours[i], theirs[n].numpy(), err_msg=n)
    fused = ref.model.audio_fusion.calc_length(theirs).clamp_min(1).numpy()
    return ours, fused


# ------------------------------------------------------------------------------------------- tests


def test_whisper_batchnorm_adapter_training_then_eval():
    """whisper_batch.yaml (fusion "sum", one encoder): training-mode forwards on a padded batch whose longest clip
    is odd (7 frames; a 1-frame clip keeps max(1 // 2, 1) = 1 token), then even (6); outputs and BatchNorm running
    statistics after each; then eval mode on the updated statistics."""
    names = ["whisper"]
    conn, rule = build(ConnectorConfig(kind="alarm", adapter_dim=ADAPTER, adapters=("batch",)), names)
    ref = Alarm([conv_adapter("whisper", "batch")], {"fusion_type": "sum"}, seed=0)
    load(conn, ref, names)
    ref.model.train()
    for frames, seed in (([7, 4, 1], 1), ([6, 3, 5], 2)):
        samples = [samples_for(f) for f in frames]
        ours, theirs, lengths = inputs(names, samples, seed=seed)
        compare("batchnorm train", run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
        compare_stats("batchnorm running stats", bn_stats(conn), ref.bn_stats("whisper"))
        _, fused = compare_lengths(conn, ref, names, samples, lengths)
        np.testing.assert_array_equal(fused, [max(f // 2, 1) for f in frames])
    ref.model.eval()
    conn.eval()
    samples = [samples_for(f) for f in (5, 8, 2)]
    ours, theirs, lengths = inputs(names, samples, seed=3)
    compare("batchnorm eval", run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
    compare_stats("batchnorm running stats", bn_stats(conn), ref.bn_stats("whisper"))   # eval changed nothing


@pytest.mark.parametrize("name,kind", [("w2vbert", "layer"), ("muq", "mlp")], ids=["layernorm", "mlp"])
def test_layernorm_and_mlp_adapters(name, kind):
    """w2vbert.yaml (LayerNorm conv adapter: T // 2 tokens) and muq.yaml (MLP: T tokens), odd and even longest
    clips in a padded batch."""
    conn, rule = build(ConnectorConfig(kind="alarm", adapter_dim=ADAPTER, adapters=(kind,)), [name])
    cfg = conv_adapter(name, "layer") if kind == "layer" else mlp_adapter(name)
    ref = Alarm([cfg], {"fusion_type": "sum"}, seed=4)
    load(conn, ref, [name])
    ref.model.train()
    for frames, seed in (([9, 4, 2], 5), ([6, 3, 5], 6)):
        samples = [samples_for(f) for f in frames]
        ours, theirs, lengths = inputs([name], samples, seed=seed)
        compare(kind, run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
        compare_lengths(conn, ref, [name], samples, lengths)


CA_NAMES = ["whisper", "w2vbert", "muq"]


def ca_pair(seed):
    """alarm_ca.yaml's structure, tiny: Whisper (BatchNorm), W2V-BERT (LayerNorm), a 50 Hz MLP stream; CA layers
    (1, 2) -> (ours, its token rule, ALARM)."""
    conn, rule = build(ConnectorConfig(kind="alarm_ca", adapter_dim=ADAPTER, hidden=16, intermediate=32,
                                       fusion_heads=4, fusion_layers=(1, 2), adapters=("batch", "layer", "mlp")),
                       CA_NAMES)
    fusion = dict(fusion_type="crossattention", llm_embedding_dim=LLM, hidden_dim=16, ffn_dims=32, dropout=0.0,
                  num_attention_heads=4, num_hidden_layers=[1, 2], main_encoder="whisper",
                  conditional_encoders=["w2vbert", "muq"], use_skip_connection=False)
    ref = Alarm([conv_adapter("whisper", "batch"), conv_adapter("w2vbert", "layer"), mlp_adapter("muq")], fusion,
                seed=seed)
    load(conn, ref, CA_NAMES)
    return conn, rule, ref


def test_crossattention_fusion_and_fused_length():
    """ALARM-CA, adapters training: outputs, BatchNorm statistics, and the fused length = the max over the streams
    (here the MLP stream's T > Whisper's T // 2)."""
    conn, rule, ref = ca_pair(seed=7)
    ref.model.train()
    for frames, seed in (([7, 4, 6], 8), ([8, 5, 2], 9)):
        samples = [samples_for(f) for f in frames]
        ours, theirs, lengths = inputs(CA_NAMES, samples, seed=seed)
        compare("crossattention", run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
        compare_stats("crossattention running stats", bn_stats(conn), ref.bn_stats("whisper"))
        streams, fused = compare_lengths(conn, ref, CA_NAMES, samples, lengths)
        np.testing.assert_array_equal(np.asarray(conn.fused_lengths([jnp.asarray(s) for s in streams])), fused)
        np.testing.assert_array_equal(fused, np.maximum(np.max(streams, axis=0), 1))
        assert fused[0] == streams[2][0] > streams[0][0]   # the MLP stream's 7 frames, not Whisper's 7 // 2


def test_crossattention_clip_with_an_empty_main_stream():
    """ALARM-CA, a clip whose main (Whisper) stream has 0 adapted tokens (under 480 samples, 30 ms): every key of
    its self- and cross-attention is masked (both masks come from the main lengths), yet the clip keeps >= 1
    token (max over streams, clamp_min(1)). ALARM's nn.TransformerDecoderLayer (crossattention.py:66-73; torch
    MHA -> scaled_dot_product_attention) gives such a row a zero attention context (out_proj bias only), as our
    decoder layers do (`MultiHeadAttention(fully_masked="zero")`, fusion.py PreNormDecoderLayer); the default
    "uniform" (the Perceiver's) would average the padded keys and differ."""
    conn, rule, ref = ca_pair(seed=7)
    ref.model.train()
    samples = [samples_for(f) for f in (8, 5, 1)]
    ours, theirs, lengths = inputs(CA_NAMES, samples, seed=9)
    got, want = run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths)
    compare("crossattention", got[:2], want[:2], rule, samples[:2])   # the other clips agree
    assert len(want[2]) == rule(samples[2]) == 1 + 2
    diff = float(np.max(np.abs(got[2, :3] - want[2].numpy())))
    assert diff <= TOL, f"clip with 0 Whisper tokens: max |ours - ALARM| = {diff:.3g}"
    MAX_DIFF["crossattention, 0 main tokens"] = diff
    attns = [m for _, m in nnx.iter_graph(conn.fusion) if isinstance(m, MultiHeadAttention)]
    assert len(attns) == 2 * 3 and {a.fully_masked for a in attns} == {"zero"}   # 3 decoder layers
    for a in attns:                      # the Perceiver's rule instead: only that clip changes, away from ALARM
        a.fully_masked = "uniform"
    uniform = run(conn, ours, jnp.asarray(samples))
    np.testing.assert_array_equal(uniform[:2], got[:2])
    assert float(np.max(np.abs(uniform[2, :3] - want[2].numpy()))) > 100 * TOL


@pytest.mark.parametrize("blocks,layers,cross,shared,train", [(3, 2, 1, True, True), (2, 1, 2, False, False)],
                         ids=["published-shape-train", "unshared-eval"])
def test_multiperceiver_fusion(blocks, layers, cross, shared, train):
    """alarm_p.yaml's structure: Whisper (BatchNorm conv adapter) + identity conditional streams, one Perceiver
    each (3 latents), `[cond_start, latents..., cond_end, main]`: T // 2 + 2 * 3 + 2 rows before the boundary."""
    names = ["whisper", "w2vbert", "muq"]
    conn, rule = build(ConnectorConfig(kind="alarm_p", adapter_dim=ADAPTER, norm="batch", perceiver_latents=3,
                                       perceiver_dim=8, perceiver_heads=2, perceiver_cross_heads=2,
                                       perceiver_blocks=blocks, perceiver_block_layers=layers,
                                       perceiver_cross_layers=cross, perceiver_shared=shared), names)
    two = lambda v: [v, v]   # noqa: E731  (one entry per conditional encoder)
    fusion = dict(fusion_type="multiperceiver", llm_embedding_dim=LLM, num_latents=two(3),
                  num_latent_channels=two(8), num_cross_attention_heads=two(2), num_cross_attention_layers=two(cross),
                  first_cross_attention_layer_shared=two(shared), first_self_attention_block_shared=two(shared),
                  num_self_attention_heads=two(2), num_self_attention_blocks=two(blocks),
                  num_self_attention_layers_per_block=two(layers), main_encoder="whisper",
                  conditional_encoders=names[1:], conditional_embedding_dim=[DIMS[n] for n in names[1:]])
    ref = Alarm([conv_adapter("whisper", "batch"), identity_adapter("w2vbert"), identity_adapter("muq")], fusion,
                seed=10)
    load(conn, ref, names)
    samples = [samples_for(f) for f in (7, 3)]
    ours, theirs, lengths = inputs(names, samples, seed=11)
    # ALARM's MultiPerceiverFusion.forward returns (main_output, None) (fusion_implementations/perceiver.py:240),
    # AudioFusion.forward passes the tuple on (audio_fusion.py:24-25), so its own get_audio_embeddings fails on
    # it (llm_audio_wrapper.py:117 `audio[i, : lengths[i]]`): an upstream bug; the tensor is taken below.
    ref.model.eval()
    with pytest.raises(TypeError):
        ref(theirs, lengths)
    fm = ref.model.audio_fusion.fusion_model
    fm.forward = types.MethodType(lambda self, o, n: type(self).forward(self, o, n)[0], fm)   # its tensor
    ref.model.train(train)
    if not train:
        conn.eval()
    compare(f"multiperceiver {'train' if train else 'eval'}", run(conn, ours, jnp.asarray(samples)),
            ref(theirs, lengths), rule, samples)
    compare_stats("multiperceiver running stats", bn_stats(conn), ref.bn_stats("whisper"))
    streams, fused = compare_lengths(conn, ref, names, samples, lengths)
    np.testing.assert_array_equal(fused, streams[0] + 2 * 3 + 2)


# ------------------------------------------------------------------------------------------- frames per clip

# Clip lengths (16 kHz samples): tiny, odd / even frame counts, multiples of 160 (1120 = 7 * 160), over 30 s
# (481_000; 487_520 = 30 s + 47 * 160).
LENGTHS = [400, 1000, 1120, 3200, 12345, 16000, 16100, 24000, 481_000, 487_520]


def alarm_whisper_frames(lengths):
    """ALARM's Whisper lengths: its feature extractor (feature_extractor_implementations/whisper.py: 30 s pieces
    through the HF WhisperFeatureExtractor of whisper-large-v3, `audio_attention.sum()`), then the encoder's
    `calc_length` = lengths // 2 (encoder_implementations/whisper.py:19-20)."""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=128)   # whisper-large-v3: 128 mels, hop 160, 30 s chunks
    pieces, owner = [], []
    for i, n in enumerate(lengths):   # every clip's 30 s pieces, all clips through one extractor call
        pieces += [np.zeros(min(480_000, n - s), np.float32) for s in range(0, n, 480_000)]
        owner += [i] * len(range(0, n, 480_000))
    mask = fe(pieces, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")["attention_mask"]
    per_piece = mask.sum(-1).numpy()
    return np.asarray([int(per_piece[np.asarray(owner) == i].sum()) // 2 for i in range(len(lengths))])


def alarm_w2v_bert_frames(lengths):
    """ALARM's W2V-BERT lengths (feature_extractor_implementations/w2vbert.py): the waveform zero-padded by 160
    samples on each side, the HF SeamlessM4TFeatureExtractor (w2v-bert-2.0: 80 mels, stride 2),
    `audio_attention.sum()`; the encoder keeps them (BaseAudioEncoder.calc_length)."""
    from transformers import SeamlessM4TFeatureExtractor
    fe = SeamlessM4TFeatureExtractor()
    out = []
    for n in lengths:
        audio = torch.nn.functional.pad(torch.zeros(1, n), (160, 160))
        mask = fe([audio[0].numpy()], sampling_rate=16000, return_attention_mask=True,
                  return_tensors="pt")["attention_mask"]
        out.append(int(mask.sum()))
    return np.asarray(out)


def alarm_whisper_rule():
    cc = ConnectorConfig(kind="alarm", adapter_dim=ADAPTER, adapters=("batch",))
    return token_rule_for(connector_class(cc.kind), cc, [EncoderConfig(kind="whisper", input_convention=ALARM)])


def test_whisper_frames_off_the_160_sample_grid_follow_alarm():
    """Off multiples of 160 samples, Whisper encoder frames and tokens (T // 2, at least 1, + 2) = ALARM's, under
    either input convention (ceil(n / 160) = n // 160 + 1 there)."""
    lengths = np.asarray([n for n in LENGTHS if n % 160])
    want = alarm_whisper_frames(lengths)
    np.testing.assert_array_equal(np.asarray(encoder_frames(lengths, "whisper", ALARM)), want)
    np.testing.assert_array_equal(np.asarray(encoder_frames(lengths, "whisper")), want)
    np.testing.assert_array_equal([alarm_whisper_rule()(int(n)) for n in lengths], np.maximum(want // 2, 1) + 2)


def test_whisper_frames_on_the_160_sample_grid_follow_alarm():
    """On multiples of 160 samples (over 30 s too: ALARM's 30 s pieces), `input_convention: alarm` counts ALARM's
    frames, the HF attention mask ceil(n / 160) then // 2 (feature_extractor_implementations/whisper.py:47
    `audio_attention.sum()`, encoder_implementations/whisper.py:20); the native rule (n // 160 + 1) // 2 stays,
    one frame more where n / 160 is odd (1120 samples: native 4 frames / 2 tokens, ALARM 3 / 1)."""
    lengths = np.asarray([n for n in LENGTHS if n % 160 == 0])
    want = alarm_whisper_frames(lengths)
    np.testing.assert_array_equal(np.asarray(encoder_frames(lengths, "whisper", ALARM)), want)
    np.testing.assert_array_equal(np.asarray(jnp.asarray(encoder_frames(jnp.asarray(lengths), "whisper", ALARM))),
                                  want)
    np.testing.assert_array_equal([alarm_whisper_rule()(int(n)) for n in lengths], np.maximum(want // 2, 1) + 2)
    native = np.asarray(encoder_frames(lengths, "whisper"))
    np.testing.assert_array_equal(native, (lengths // 160 + 1) // 2)
    np.testing.assert_array_equal(native - want, (lengths // 160) % 2)
    assert (lengths // 160 % 2).any() and not (lengths // 160 % 2).all()   # both cases are covered


def test_w2v_bert_frames_follow_alarm():
    """`input_convention: alarm` counts ALARM's W2V-BERT frames: the waveform zero-padded by 160 samples on each
    side before the feature extractor (feature_extractor_implementations/w2vbert.py:26), (1 + (n - 80) // 160)
    // 2; the native rule stays the extractor's on the clip alone, (1 + (n - 400) // 160) // 2 (1 s: 49, ALARM 50)."""
    lengths = np.asarray(LENGTHS)
    want = alarm_w2v_bert_frames(lengths)
    np.testing.assert_array_equal(np.asarray(encoder_frames(lengths, "w2v_bert", ALARM)), want)
    # the whole difference is ALARM's padding: the native rule on the 320-sample longer waveform gives its counts
    np.testing.assert_array_equal(np.asarray(encoder_frames(lengths + 320, "w2v_bert")), want)
    native = np.asarray(encoder_frames(lengths, "w2v_bert"))
    np.testing.assert_array_equal(native, (lengths >= 400) * (1 + (lengths - 400) // 160) // 2)
    assert native[LENGTHS.index(16000)] == 49 and want[LENGTHS.index(16000)] == 50
    cc = ConnectorConfig(kind="alarm", adapter_dim=ADAPTER, adapters=("layer",))
    rule = token_rule_for(connector_class(cc.kind), cc, [EncoderConfig(kind="w2v_bert", input_convention=ALARM)])
    np.testing.assert_array_equal([rule(int(n)) for n in lengths], np.maximum(want // 2, 1) + 2)


def test_w2v_bert_features_follow_alarm():
    """The features themselves: ALARM's path (zero-pad 160 samples each side, the HF SeamlessM4TFeatureExtractor,
    one clip at a time) against ours on a padded batch, `w2v_bert_features(..., edge_pad=ALARM_EDGE_PAD)` (the
    on-device path `input_convention: alarm` takes) and its float64 host twin: values, masks, lengths."""
    from transformers import SeamlessM4TFeatureExtractor
    fe = SeamlessM4TFeatureExtractor()
    lengths = [3200, 12345, 16000]
    rng = np.random.default_rng(12)
    audio = np.zeros((len(lengths), max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.1 * rng.normal(size=n)
    got = w2v_bert_features(jnp.asarray(audio), jnp.asarray(lengths), edge_pad=ALARM_EDGE_PAD)
    host = w2v_bert_features_numpy(audio, np.asarray(lengths), edge_pad=ALARM_EDGE_PAD)
    for i, n in enumerate(lengths):
        clip = torch.nn.functional.pad(torch.from_numpy(audio[i:i + 1, :n]), (160, 160))
        out = fe([clip[0].numpy()], sampling_rate=16000, return_attention_mask=True, return_tensors="np")
        feats, mask = out["input_features"][0], out["attention_mask"][0].astype(bool)
        t = int(mask.sum())             # valid rows; an odd fbank frame count adds a half-filled row
        assert t == int(encoder_frames(n, "w2v_bert", ALARM)) and len(feats) in (t, t + 1)
        for key, (f, m) in (("w2v-bert features (jax)", got), ("w2v-bert features (host)", host)):
            f, m = np.asarray(f)[i], np.asarray(m)[i]
            np.testing.assert_array_equal(m, np.arange(len(m)) < t)
            diff = float(np.max(np.abs(f[:len(feats)] - feats)))
            assert diff <= TOL, (key, n, diff)
            assert not f[len(feats):].any()
            MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), diff)
