"""ALARM connectors against a torch re-implementation of ALARM's own audio path (`alm_jax/testing/torch_alarm.py`,
ALARM's module structure and state-dict keys) with the same weights: token counts (T // 2, at least 1; the
fused length the max over streams), trimming to the batch's longest clip, per-stream adapters (BatchNorm,
LayerNorm, MLP, identity), CA and Perceiver fusion, BatchNorm in training and eval mode, frozen adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.errors import ConfigError
from alm_jax.models.connectors import CONNECTORS, EncoderInfo, connector_class, freeze_statistics, token_rule_for
from alm_jax.testing.torch_alarm import Adapter, AlarmAudioPath, AudioFusion, load_alarm_state_dict, randomize_

TOL = 1e-4
LLM = 20
FAST = {"xla_backend_optimization_level": 0}
TAPS = {"whisper": (1, 3), "w2vbert": (0, 2, 3), "muq": (2,)}
DIMS = {"whisper": 12, "w2vbert": 10, "muq": 6}
KIND = {"whisper": "whisper", "w2vbert": "w2v_bert", "muq": "whisper"}   # our frame rule of each stream


def samples_for(frames: int) -> int:
    """Valid 16 kHz samples giving `frames` Whisper encoder frames."""
    return 320 * frames - 100


def build(cc: ConnectorConfig, names):
    infos = [EncoderInfo(dim=DIMS[n], taps=TAPS[n], n_entries=4, frames=KIND[n]) for n in names]
    rule = token_rule_for(connector_class(cc.kind), cc, [EncoderConfig(kind=KIND[n]) for n in names])
    return CONNECTORS[cc.kind](cc, infos, LLM, rngs=nnx.Rngs(0)), rule


_JITTED: dict = {}


def run(model, states, samples):
    """model(states, samples) under jit (one compile per graph and shapes); BatchNorm statistics written back."""
    graphdef, state = nnx.split(model)
    if graphdef not in _JITTED:
        def fwd(state, states, samples):
            m = nnx.merge(graphdef, state)
            return m(states, samples), nnx.state(m)
        _JITTED[graphdef] = jax.jit(fwd, compiler_options=FAST)
    out, state = _JITTED[graphdef](state, states, samples)
    nnx.update(model, state)
    return np.asarray(out)


def inputs(names, samples, buffer=16, seed=0):
    """Random hidden states (4 entries per encoder, `buffer` rows: padding past each clip is random too, as an
    encoder's output over padding is) -> (ours: list per stream, ALARM's: {name: [4, B, T, D]}, lengths)."""
    rng = np.random.default_rng(seed)
    ours, theirs, lengths = [], {}, {}
    for n in names:
        h = rng.normal(size=(4, len(samples), buffer, DIMS[n])).astype(np.float32)
        ours.append([jnp.asarray(x) for x in h])
        theirs[n] = torch.from_numpy(h)
        lengths[n] = torch.from_numpy(np.asarray(encoder_frames(np.asarray(samples), KIND[n]), np.int64))
    return ours, theirs, lengths


def compare(got, want, rule, samples):
    """Per clip: the reference's rows (boundary included) = ours, zeros after; the token rule counts them."""
    for i, (w, n) in enumerate(zip(want, samples)):
        w = w.detach().numpy()
        assert len(w) == rule(int(n)), (i, len(w), rule(int(n)))
        assert float(np.max(np.abs(got[i, :len(w)] - w))) <= TOL, (i, float(np.max(np.abs(got[i, :len(w)] - w))))
        assert not np.any(got[i, len(w):])
    np.testing.assert_array_equal(np.asarray(rule(np.asarray(samples))), [rule(int(n)) for n in samples])


def adapter(name, kind, norm="batch", proj=True):
    return Adapter(kind, TAPS[name], DIMS[name], 8, LLM, norm=norm, use_llm_proj=proj)


def bn_stats(conn):
    return [(np.asarray(n.mean[...]), np.asarray(n.var[...])) for a in conn.adapters
            for n in (getattr(a, "norm1", None), getattr(a, "norm2", None)) if hasattr(n, "mean")]


def torch_stats(ref, name):
    d = ref.audio_adapter.adapters[name].adapter.downsampler
    return [(d[k][2].running_mean.numpy(), d[k][2].running_var.numpy()) for k in (0, 1)]


def test_adapter_with_batchnorm_train_and_eval_and_odd_lengths():
    """Single-encoder ALARM (Whisper, BatchNorm): training-mode outputs and running statistics over two batches
    (longest clip odd, then even; a clip of one frame keeps 1 token), then eval mode."""
    cc = ConnectorConfig(kind="alarm", adapter_dim=8, adapters=("batch",))
    conn, rule = build(cc, ["whisper"])
    ref = randomize_(AlarmAudioPath({"whisper": adapter("whisper", "downsampler")}, AudioFusion("sum"), LLM))
    load_alarm_state_dict(conn, ref.state_dict(), ["whisper"])
    ref.train()
    for frames, seed in (([7, 4, 1], 1), ([6, 3, 5], 2)):
        samples = [samples_for(f) for f in frames]
        ours, theirs, lengths = inputs(["whisper"], samples, seed=seed)
        got = run(conn, ours, jnp.asarray(samples))
        compare(got, ref(theirs, lengths), rule, samples)
        for (m, v), (tm, tv) in zip(bn_stats(conn), torch_stats(ref, "whisper")):
            assert np.max(np.abs(m - tm)) <= 1e-5 and np.max(np.abs(v - tv)) <= 1e-5
    assert rule(samples_for(1)) == 1 + 2 and rule(samples_for(7)) == 3 + 2        # T // 2, at least 1
    ref.eval()
    conn.eval()
    before = bn_stats(conn)
    samples = [samples_for(f) for f in (5, 8, 2)]
    ours, theirs, lengths = inputs(["whisper"], samples, seed=3)
    compare(run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
    for (m, v), (m0, v0) in zip(bn_stats(conn), before):
        np.testing.assert_array_equal(m, m0)


def test_padding_past_the_longest_clip_and_empty_slots_change_nothing():
    """Trimming: what follows the batch's longest clip (a longer buffer, other values there, an empty clip slot)
    changes neither the outputs nor the BatchNorm statistics."""
    cc = ConnectorConfig(kind="alarm", adapter_dim=8, adapters=("batch",))
    conn, _ = build(cc, ["whisper"])
    samples = [samples_for(f) for f in (7, 4)]
    ours, _, _ = inputs(["whisper"], samples, buffer=16, seed=4)
    a = run(conn, ours, jnp.asarray(samples))
    stats = bn_stats(conn)
    conn2, _ = build(cc, ["whisper"])
    rng = np.random.default_rng(5)

    def noise(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)
    longer = [[jnp.concatenate([h[:, :7], noise(2, 13, 12)], axis=1) for h in ours[0]]]   # other padding, longer
    empty = [[jnp.concatenate([h, noise(1, 20, 12)]) for h in longer[0]]]               # + an empty clip slot
    b = run(conn2, empty, jnp.asarray(samples + [0]))
    assert float(np.max(np.abs(a[:, :6] - b[:2, :6]))) <= 1e-5
    for (m, v), (m2, v2) in zip(stats, bn_stats(conn2)):
        assert np.max(np.abs(m - m2)) <= 1e-5 and np.max(np.abs(v - v2)) <= 1e-5


def test_alarm_ca_per_stream_adapters_and_max_fused_length():
    """ALARM-CA with BatchNorm (Whisper), LayerNorm (W2V-BERT) and MLP (a 50 Hz stream: its T frames outnumber
    Whisper's T // 2, so the fused length is its) adapters, layers per stream (1, 2), adapters training."""
    names = ["whisper", "w2vbert", "muq"]
    cc = ConnectorConfig(kind="alarm_ca", adapter_dim=8, hidden=16, intermediate=32, fusion_heads=4,
                         fusion_layers=(1, 2), adapters=("batch", "layer", "mlp"))
    conn, rule = build(cc, names)
    fusion = AudioFusion("crossattention", llm_dim=LLM, hidden_dim=16, ffn_dims=32, dropout=0.0,
                         num_attention_heads=4, num_hidden_layers=[1, 2], main_encoder="whisper",
                         conditional_encoders=["w2vbert", "muq"])
    ref = randomize_(AlarmAudioPath({"whisper": adapter("whisper", "downsampler"),
                                     "w2vbert": adapter("w2vbert", "downsampler", "layer"),
                                     "muq": adapter("muq", "mlp")}, fusion, LLM), seed=1)
    load_alarm_state_dict(conn, ref.state_dict(), names)
    ref.train()
    samples = [samples_for(f) for f in (7, 4, 6)]
    ours, theirs, lengths = inputs(names, samples, seed=6)
    got = run(conn, ours, jnp.asarray(samples))
    compare(got, ref(theirs, lengths), rule, samples)
    assert rule(samples[0]) == 7 + 2   # the MLP stream's 7 frames, not Whisper's 7 // 2


@pytest.mark.parametrize("blocks,layers,cross,shared", [(3, 2, 1, True), (2, 1, 2, False)],
                         ids=["published-shape", "unshared"])
def test_alarm_p_perceivers(blocks, layers, cross, shared):
    names = ["whisper", "w2vbert", "muq"]
    cc = ConnectorConfig(kind="alarm_p", adapter_dim=8, norm="batch", perceiver_latents=3, perceiver_dim=8,
                         perceiver_heads=2, perceiver_cross_heads=2, perceiver_blocks=blocks,
                         perceiver_block_layers=layers, perceiver_cross_layers=cross, perceiver_shared=shared)
    conn, rule = build(cc, names)
    fusion = AudioFusion("multiperceiver", llm_dim=LLM, main_encoder="whisper", conditional_encoders=names[1:],
                         conditional_embedding_dim=[DIMS[n] for n in names[1:]], num_latents=3, num_latent_channels=8,
                         num_cross_attention_heads=2, num_cross_attention_layers=cross,
                         first_cross_attention_layer_shared=shared, num_self_attention_heads=2,
                         num_self_attention_layers_per_block=layers, num_self_attention_blocks=blocks,
                         first_self_attention_block_shared=shared)
    ref = randomize_(AlarmAudioPath({"whisper": adapter("whisper", "downsampler"),
                                     "w2vbert": adapter("w2vbert", "identity", proj=False),
                                     "muq": adapter("muq", "identity", proj=False)}, fusion, LLM), seed=2)
    load_alarm_state_dict(conn, ref.state_dict(), names)
    ref.eval()
    conn.eval()
    samples = [samples_for(f) for f in (7, 3)]
    ours, theirs, lengths = inputs(names, samples, seed=7)
    compare(run(conn, ours, jnp.asarray(samples)), ref(theirs, lengths), rule, samples)
    assert rule(samples[1]) == 3 // 2 + 2 * 3 + 2 + 2


def test_a_frozen_adapter_runs_on_its_running_statistics():
    """`freeze_statistics`: a training forward normalizes with the running statistics (= torch eval mode) and
    leaves them unchanged; `model.train()` does not undo it."""
    cc = ConnectorConfig(kind="alarm", adapter_dim=8, adapters=("batch",))
    conn, rule = build(cc, ["whisper"])
    ref = randomize_(AlarmAudioPath({"whisper": adapter("whisper", "downsampler")}, AudioFusion("sum"), LLM), seed=3)
    load_alarm_state_dict(conn, ref.state_dict(), ["whisper"])
    assert freeze_statistics(conn) == 2
    conn.train()
    before = bn_stats(conn)
    samples = [samples_for(f) for f in (6, 5)]
    ours, theirs, lengths = inputs(["whisper"], samples, seed=8)
    compare(run(conn, ours, jnp.asarray(samples)), ref.eval()(theirs, lengths), rule, samples)
    for (m, v), (m0, v0) in zip(bn_stats(conn), before):
        np.testing.assert_array_equal(m, m0)
        np.testing.assert_array_equal(v, v0)


def test_whisper_windows_encode_each_piece_alone():
    """`window_seconds`: a 0.8 s clip in 0.5 s windows = its two pieces, each padded to 0.5 s and encoded alone;
    a shorter clip's window past its end enters as zero features (ALARM's batch padding); tokens count all
    windows' frames (50 + 30 -> 40 -> 20 + 2)."""
    from test_alm import clips, tiny_encoder, tiny_llm

    from alm_jax.audio.features import log_mel
    from alm_jax.models.alm import AudioLanguageModel
    ecfg = EncoderConfig(kind="whisper", taps=(1, 2), tap_indexing="hf", pad_to_seconds=None, window_seconds=0.5)
    enc, llm = tiny_encoder(), nnx.eval_shape(tiny_llm)   # the LLM is not run: its shapes suffice
    model = AudioLanguageModel([enc], llm, ConnectorConfig(kind="alarm", adapter_dim=16), [ecfg], rngs=nnx.Rngs(0))
    a, b = clips(2, seconds=0.8)
    audio = np.stack([a, np.pad(b[:4800], (0, 8000))])
    samples = jnp.array([12800, 4800])
    got = jax.jit(lambda x, n: model.encoder_states(0, x, None, n))(jnp.asarray(audio), samples)
    one = jax.jit(lambda f: enc(f, keep=(0, 1)).hidden_states)
    pad = lambda x: np.pad(x, (0, 8000 - len(x)))   # noqa: E731  (log_mel pads too; stacking needs one length)
    pieces = log_mel(jnp.asarray(np.stack([pad(a[:8000]), pad(a[8000:]), pad(b[:4800])])), n_mels=80,
                     pad_to_seconds=0.5)
    want = one(jnp.concatenate([pieces, jnp.zeros_like(pieces[:1])]))        # [a0, a1, b0, zero features]
    for g, w in zip(got, want, strict=True):
        assert g.shape == (2, 50, 32)
        np.testing.assert_allclose(np.asarray(g).reshape(4, 25, 32), np.asarray(w), atol=2e-5)
    assert model.num_audio_tokens(12800) == 20 + 2 and model.num_audio_tokens(4800) == 7 + 2
    with pytest.raises(ConfigError, match="pad_to_seconds null"):
        AudioLanguageModel([enc], llm, ConnectorConfig(kind="alarm"),
                           [EncoderConfig(taps=(1,), tap_indexing="hf", window_seconds=30.0)], rngs=nnx.Rngs(0))


@pytest.mark.parametrize("win", [8000, 480_000], ids=["0.5s", "30s"])
def test_alarm_convention_counts_windowed_whisper_frames_as_alarm(win):
    """`input_convention: alarm` with `window_seconds`: ALARM sums its pieces' attention masks (ceil(piece / 160)
    each) then halves; ceil(n / 160) // 2 is that count for any clip (the window a multiple of 160 samples), and
    it never passes the concatenated windows' rows (window / 320 each). A model built so counts its tokens by it
    (8800 samples = 55 * 160: ALARM 27 frames / 13 + 2 tokens, native 28 / 14 + 2)."""
    n = np.concatenate([np.arange(1, 3 * win + 1, 997), np.arange(160, 3 * win + 1, 160)])
    got = encoder_frames(n, "whisper", "alarm")
    pieces = n // win * (win // 160) + -(-(n % win) // 160)
    np.testing.assert_array_equal(got, pieces // 2)
    assert (got <= -(-n // win) * (win // 320)).all()
    if win != 8000:
        return
    from test_alm import tiny_encoder, tiny_llm

    from alm_jax.models.alm import AudioLanguageModel
    llm = nnx.eval_shape(tiny_llm)
    kw = dict(kind="whisper", taps=(1, 2), tap_indexing="hf", pad_to_seconds=None, window_seconds=0.5)
    for convention, tokens in (("alarm", 13 + 2), ("native", 14 + 2)):
        model = AudioLanguageModel([tiny_encoder()], llm, ConnectorConfig(kind="alarm", adapter_dim=16),
                                   [EncoderConfig(input_convention=convention, **kw)], rngs=nnx.Rngs(0))
        assert model.num_audio_tokens(8800) == tokens, convention
        np.testing.assert_array_equal(np.asarray(model.connector.adapted(jnp.array([8800, 12800]))), [tokens - 2, 20])
