"""W2V-BERT inside the ALM: `load_encoder` by model_type, `build_alm` with a `w2v_bert` encoder, the per-encoder
frame rule (token counts, masks), on-device fbank features in `encoder_states`, and an ALARM-CA model fusing
Whisper + W2V-BERT (tiny configs) overfitting a batch."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_alm import clips, overfit, tiny_encoder, tiny_llm
from test_w2v_bert import save_tiny_w2v_bert

import alm_jax
from alm_jax.audio.fbank import ALARM_EDGE_PAD, fbank_frames, stacked_frames, w2v_bert_features
from alm_jax.audio.features import encoder_frames
from alm_jax.config import ConnectorConfig, EncoderConfig, ModelConfig
from alm_jax.errors import AudioError, ConfigError, WeightImportError
from alm_jax.models.alm import AudioLanguageModel, split_trainable
from alm_jax.models.connectors import connector_token_rule
from alm_jax.models.w2v_bert import W2VBertConfig, W2VBertModel
from alm_jax.models.whisper import WhisperEncoder

SR = 16000
CA = ConnectorConfig(kind="alarm_ca", adapter_dim=32, fusion_layers=(1,), fusion_heads=4, hidden=32,
                     adapters=("batch", "layer"))   # ALARM-CA's: BatchNorm for Whisper, LayerNorm for W2V-BERT


def tiny_w2v_bert(d=48, seed=2) -> W2VBertModel:
    cfg = W2VBertConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * d,
                        conv_depthwise_kernel_size=5, left_max_position_embeddings=8, right_max_position_embeddings=4)
    return W2VBertModel(cfg, rngs=nnx.Rngs(seed))


def fused_model(seed=0, connector=CA, convention="native") -> AudioLanguageModel:
    """Whisper (main stream) + W2V-BERT, ALARM taps on HF hidden_states, trimmed audio, both encoders under
    input `convention`."""
    kw = dict(taps=(1, 2), tap_indexing="hf", pad_to_seconds=None, input_convention=convention)
    ecfgs = [EncoderConfig(kind="whisper", **kw), EncoderConfig(kind="w2v_bert", **kw)]
    return AudioLanguageModel([tiny_encoder(d=32, seed=1), tiny_w2v_bert()], tiny_llm(seed), connector, ecfgs,
                              rngs=nnx.Rngs(seed + 10))


@nnx.jit
def _states(model, audio, samples):
    return model.encoder_states(1, audio, audio_samples=samples)


@nnx.jit
def _audio_tokens(model, audio, samples):
    return model.audio_tokens(audio, samples)


def test_frame_rules():
    n = np.array([0, 399, 400, 8000, 16000, 16160, 480000])
    np.testing.assert_array_equal(encoder_frames(n, "w2v_bert"), [0, 0, 0, 24, 49, 49, 1499])
    np.testing.assert_array_equal(encoder_frames(n, "whisper"), [0, 1, 1, 25, 50, 51, 1500])
    np.testing.assert_array_equal(encoder_frames(n), encoder_frames(n, "whisper"))
    np.testing.assert_array_equal(encoder_frames(n, "whisper", "native"), encoder_frames(n, "whisper"))
    assert encoder_frames(16000, "w2v_bert") == stacked_frames(16000) == 49
    # ALARM's input convention: Whisper ceil(n / 160) // 2, W2V-BERT on the clip padded by 160 zeros each side
    np.testing.assert_array_equal(encoder_frames(n, "whisper", "alarm"), [0, 1, 1, 25, 50, 50, 1500])
    np.testing.assert_array_equal(encoder_frames(n, "w2v_bert", "alarm"), [0, 1, 1, 25, 50, 50, 1500])
    np.testing.assert_array_equal(encoder_frames(n, "w2v_bert", "alarm"), stacked_frames(n + 2 * ALARM_EDGE_PAD))
    with pytest.raises(AudioError, match="frame rule"):
        encoder_frames(16000, "mystery")
    with pytest.raises(AudioError, match="input convention 'ALARM'"):
        encoder_frames(16000, "whisper", "ALARM")
    with pytest.raises(AudioError, match="no 'alarm' input convention"):
        encoder_frames(16000, "clap", "alarm")


def test_load_encoder_by_model_type(tmp_path):
    from transformers import WhisperConfig, WhisperModel
    save_tiny_w2v_bert(tmp_path / "w2v")
    WhisperModel(WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                               encoder_ffn_dim=48, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=48,
                               vocab_size=64, max_source_positions=100, max_target_positions=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(
        tmp_path / "whisper")
    w2v = alm_jax.load_encoder(tmp_path / "w2v", dtype=jnp.bfloat16)
    assert isinstance(w2v, W2VBertModel) and w2v.layers[0].ffn1.intermediate_dense.kernel[...].dtype == jnp.bfloat16
    assert isinstance(alm_jax.load_encoder(tmp_path / "whisper"), WhisperEncoder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "hubert"}')
    with pytest.raises(WeightImportError, match="hubert.*supported"):
        alm_jax.load_encoder(tmp_path / "other")


def test_build_alm_with_a_w2v_bert_encoder(tmp_path):
    from hf_tiny_llm import save, tiny_hf_llm

    from alm_jax.weights.alm_params import build_alm
    save_tiny_w2v_bert(tmp_path / "w2v")
    llm_dir = save(tiny_hf_llm("llama"), tmp_path / "llm")
    enc = EncoderConfig(path=str(tmp_path / "w2v"), kind="w2v_bert", taps=(1, 2), tap_indexing="hf", pad_to_seconds=None)
    cfg = ModelConfig(llm=llm_dir, encoders=(enc,), connector=ConnectorConfig(kind="alarm", adapter_dim=16))
    model = build_alm(cfg)
    assert isinstance(model.encoders[0], W2VBertModel)
    n = int(SR * 0.5)   # 48 fbank frames -> 24 stacked frames -> 12 adapted + 2 boundary tokens
    assert model.num_audio_tokens(n) == 12 + 2 == connector_token_rule(cfg.connector, cfg.encoders)(n)
    assert model.num_audio_tokens(8160) == 12 + 2      # 24 stacked frames; Whisper would say 26 // 2 + 2
    tokens = _audio_tokens(model, jnp.asarray(np.stack(clips(2))), jnp.array([n, n - 4000]))
    assert tokens.shape == (2, 14, 64)
    np.testing.assert_array_equal(np.asarray(tokens[1, model.num_audio_tokens(n - 4000):]), 0.0)


def test_w2v_bert_states_use_on_device_fbank_and_ignore_padding():
    model = fused_model()
    waves = clips(2, seed=5, seconds=0.6)
    n = np.array([len(waves[0]), len(waves[1]) - 2500])
    audio = np.stack(waves)
    audio[1, n[1]:] = 0.0
    states = _states(model, jnp.asarray(audio), jnp.asarray(n))
    feats, mask = w2v_bert_features(audio, n)
    want = nnx.jit(lambda e, f, m: e(f, m).hidden_states)(model.encoders[1], feats, mask)
    assert len(states) == 3 and states[-1].shape == (2, -(-int(fbank_frames(audio.shape[1])) // 2), 48)
    for a, b in zip(states, want, strict=True):   # (one fused jit vs two: float32 rounding only)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # clip 1's valid rows do not depend on how much padding follows it
    longer = np.pad(audio, ((0, 0), (0, 4000)))
    states2 = _states(model, jnp.asarray(longer), jnp.asarray(n))
    valid = int(stacked_frames(n[1]))
    for a, b in zip(states, states2):
        np.testing.assert_allclose(np.asarray(a[1, :valid]), np.asarray(b[1, :valid]), atol=1e-5)
    # host log-mel features cannot feed W2V-BERT
    with pytest.raises(ConfigError, match="host_features"):
        model.encoder_states(1, None, features=jnp.zeros((2, 80, 60)))


def test_kind_must_match_the_module():
    ecfgs = [EncoderConfig(kind="whisper"), EncoderConfig(kind="whisper")]
    with pytest.raises(ConfigError, match=r"encoders\.1\.kind='whisper' but encoder 1 is a W2VBertModel"):
        AudioLanguageModel([tiny_encoder(), tiny_w2v_bert()], tiny_llm(), CA, ecfgs, rngs=nnx.Rngs(0))


def test_alarm_ca_masks_each_stream_by_its_own_frames():
    model = fused_model()
    conn = model.connector
    assert conn.frame_rules == (("whisper", "native"), ("w2v_bert", "native"))
    n = jnp.array([8000, 16000])
    np.testing.assert_array_equal(np.asarray(conn.adapted(n, 0)), [12, 25])   # 25 // 2, 50 // 2 (ALARM's T // 2)
    np.testing.assert_array_equal(np.asarray(conn.adapted(n, 1)), [12, 24])   # 24 // 2, 49 // 2
    tok = _audio_tokens(model, jnp.asarray(np.stack(clips(2, seconds=1.0))), n)
    assert tok.shape[1] >= model.num_audio_tokens(16000) == 25 + 2


@pytest.mark.slow
def test_alarm_ca_whisper_plus_w2v_bert_overfits_a_batch():
    model = fused_model()
    _, trainable, _ = split_trainable(model)
    assert all(".encoders." not in "." + ".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable))
    losses = overfit(model)
    print(f"\n  ALARM-CA (Whisper + W2V-BERT): loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
    assert losses[-1] < 0.05, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"


@pytest.mark.slow
def test_the_trainer_runs_whisper_plus_w2v_bert_fusion(tiny, tmp_path):
    """The whole `alm train` path (config -> build_alm -> pipeline token rule -> FLOPs -> steps) with an
    ALARM-CA model fusing the tiny Whisper and a tiny W2V-BERT."""
    import json

    from tiny_setup import tiny_config

    from alm_jax.training.trainer import train
    paths = json.loads((tiny / "paths.json").read_text())
    save_tiny_w2v_bert(tmp_path / "w2v")
    cfg = tiny_config(paths, tmp_path, "model.connector.kind=alarm_ca", "model.connector.adapter_dim=32",
                      "model.connector.hidden=32", "model.connector.fusion_heads=4",
                      "model.encoders.0.tap_indexing=hf", "model.encoders.0.taps=[1,2]",
                      f"model.encoders=[{{path: {paths['whisper']}, taps: [1, 2], tap_indexing: hf, pad_to_seconds: null}},"
                      f" {{path: {tmp_path / 'w2v'}, kind: w2v_bert, taps: [1, 2], tap_indexing: hf, pad_to_seconds: null}}]",
                      "data.max_text_tokens=80", "steps=3", "optim.total_steps=3")
    result = train(cfg)
    assert result.step == 3 and all(np.isfinite(v) for v in result.losses.values())
    assert result.flops_per_step > 0 and result.bad_samples.get("bad", {}) == {}


def test_alarm_input_convention_pads_w2v_bert_and_counts_whisper_frames_as_alarm():
    """`input_convention: alarm` (ALARM's configs): W2V-BERT's states come from the fbank of each clip padded by
    160 zeros on each side (`w2v_bert_features(edge_pad=160)`), and every count follows ALARM's frames: Whisper
    ceil(n / 160) // 2, W2V-BERT the native rule on n + 320 (adapter lengths, token rule, the connector's trim)."""
    model, native = fused_model(convention="alarm"), fused_model()
    conn = model.connector
    assert conn.frame_rules == (("whisper", "alarm"), ("w2v_bert", "alarm"))
    n = jnp.array([8160, 16000])   # 51 * 160: Whisper's odd grid case
    np.testing.assert_array_equal(np.asarray(conn.adapted(n, 0)), [12, 25])    # 51 // 2 // 2, 100 // 2 // 2
    np.testing.assert_array_equal(np.asarray(native.connector.adapted(n, 0)), [13, 25])
    np.testing.assert_array_equal(np.asarray(conn.adapted(n, 1)), [12, 25])    # 25 // 2, 50 // 2
    np.testing.assert_array_equal(np.asarray(native.connector.adapted(n, 1)), [12, 24])
    assert model.num_audio_tokens(8160) == 12 + 2 and native.num_audio_tokens(8160) == 13 + 2
    assert model.num_audio_tokens(16000) == native.num_audio_tokens(16000) == 25 + 2   # Whisper's 25 > 24
    waves = clips(2, seed=6, seconds=0.6)
    samples = np.array([len(waves[0]), len(waves[1]) - 2500])
    audio = np.stack(waves)
    audio[1, samples[1]:] = 0.0
    states = _states(model, jnp.asarray(audio), jnp.asarray(samples))
    feats, mask = w2v_bert_features(audio, samples, edge_pad=ALARM_EDGE_PAD)
    assert feats.shape[1] == -(-int(fbank_frames(audio.shape[1] + 320)) // 2)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), encoder_frames(samples, "w2v_bert", "alarm"))
    want = nnx.jit(lambda e, f, m: e(f, m).hidden_states)(model.encoders[1], feats, mask)
    for a, b in zip(states, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    tok = _audio_tokens(model, jnp.asarray(audio), jnp.asarray(samples))
    for i, s in enumerate(samples):   # each clip's tokens end at the count (its end boundary), zeros after
        k = model.num_audio_tokens(int(s))
        np.testing.assert_array_equal(np.asarray(tok[i, k - 1]), np.asarray(model.connector.boundary.end[...]))
        np.testing.assert_array_equal(np.asarray(tok[i, k:]), 0.0)
    with pytest.raises(ConfigError, match=r"encoders\.0\.input_convention='ALARM'"):
        AudioLanguageModel([tiny_encoder()], tiny_llm(), ConnectorConfig(kind="alarm", adapter_dim=16),
                           [EncoderConfig(input_convention="ALARM")], rngs=nnx.Rngs(0))
