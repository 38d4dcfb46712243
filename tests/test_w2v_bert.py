"""W2V-BERT (Wav2Vec2BertModel) parity with `transformers` on tiny random checkpoints (float32, every hidden
state, with and without an attention mask, each position scheme), strict import, and the fbank feature
extractor vs `SeamlessM4TFeatureExtractor` on real audio."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

from alm_jax.audio import synth
from alm_jax.audio.fbank import fbank_frames, w2v_bert_features, w2v_bert_features_numpy
from alm_jax.errors import AudioError, ConfigError, WeightImportError
from alm_jax.models.w2v_bert import W2VBertConfig
from alm_jax.weights.w2v_bert_params import load_w2v_bert

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _hf_config(position: str | None) -> Wav2Vec2BertConfig:
    return Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              feature_projection_input_dim=160, conv_depthwise_kernel_size=5,
                              position_embeddings_type=position, left_max_position_embeddings=4,
                              right_max_position_embeddings=2, max_source_positions=64)


def save_tiny_w2v_bert(path, position: str | None = "relative_key", seed: int = 0) -> Wav2Vec2BertModel:
    """A tiny HF W2V-BERT checkpoint at `path`, every tensor perturbed (biases, norms, pos biases non-trivial)."""
    torch.manual_seed(seed)
    model = Wav2Vec2BertModel(_hf_config(position)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@nnx.jit
def _run(model, feats, mask):
    return model(feats, mask)


@pytest.mark.parametrize("position", ["relative_key", "relative", "rotary", None])
def test_hidden_states_match_transformers(tmp_path, position):
    hf = save_tiny_w2v_bert(tmp_path, position)
    ours = load_w2v_bert(tmp_path)
    assert ours.config.position_embeddings_type == position
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 23, 160)).astype(np.float32)
    mask = np.ones((2, 23), np.int64)
    mask[1, 15:] = 0
    worst = {}
    for name, m in (("no mask", None), ("mask", mask)):
        with torch.no_grad():
            ref = hf(torch.from_numpy(feats), attention_mask=None if m is None else torch.from_numpy(m),
                     output_hidden_states=True)
        out = _run(ours, jnp.asarray(feats), None if m is None else jnp.asarray(m))
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        diffs = [_maxdiff(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True)]
        diffs.append(_maxdiff(out.last_hidden_state, ref.last_hidden_state))
        worst[name] = max(diffs)
        assert max(diffs) <= TOL, (name, diffs)
        assert all(_maxdiff(a, b) == 0 for a, b in zip(out.block_outputs, out.hidden_states[1:]))
    print(f"\n  w2v-bert [{position}] max|diff| over all hidden states: {worst}")


def test_strict_import_names_the_key(tmp_path):
    src = tmp_path / "src"
    save_tiny_w2v_bert(src)

    def variant(name, edit):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        tensors = load_file(str(src / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
        return dst

    def missing(t):
        del t["encoder.layers.1.conv_module.depthwise_conv.weight"]

    def unexpected(t):
        t["encoder.layers.0.self_attn.extra.weight"] = np.zeros((32, 32), np.float32)

    def other_scheme(t):   # a tensor of another position scheme than the config's
        t["encoder.layers.0.self_attn.linear_pos.weight"] = np.zeros((32, 32), np.float32)

    def misshaped(t):
        key = "encoder.layers.0.self_attn.distance_embedding.weight"
        t[key] = np.ascontiguousarray(t[key][:-1])

    def wrapped(t):   # a task checkpoint's prefix and head are accepted / skipped
        for k in list(t):
            t["wav2vec2_bert." + k] = t.pop(k)
        t["lm_head.weight"] = np.zeros((5, 32), np.float32)

    with pytest.raises(WeightImportError, match=r"not found.*layers\.1\.conv_module\.depthwise_conv"):
        load_w2v_bert(variant("a", missing))
    with pytest.raises(WeightImportError, match=r"unexpected key 'encoder\.layers\.0\.self_attn\.extra\.weight'"):
        load_w2v_bert(variant("b", unexpected))
    with pytest.raises(WeightImportError, match=r"'encoder\.layers\.0\.self_attn\.linear_pos\.weight'.*does not have"):
        load_w2v_bert(variant("b2", other_scheme))
    with pytest.raises(WeightImportError, match=r"encoder\.layers\.0\.self_attn\.distance_embedding\.weight.*expects"):
        load_w2v_bert(variant("c", misshaped))
    load_w2v_bert(variant("d", wrapped))
    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(ConfigError, match="adapter"):
        W2VBertConfig.from_hf({**cfg, "add_adapter": True})
    assert W2VBertConfig().position_embeddings_type == Wav2Vec2BertConfig().position_embeddings_type == "relative_key"


# ---- feature extractor --------------------------------------------------------------------------------

def _clips() -> list[np.ndarray]:
    """Real audio: an espeak-ng utterance (when available) and synthesized sound events, different lengths."""
    rng = np.random.default_rng(3)
    clips = [0.5 * synth.synthesize_event("dog bark", 1.37, 16000, rng) / 4,
             synth.mix_at_snr(synth.synthesize_event("bell", 2.0, 16000, rng),
                              synth.synthesize_background("pink noise", 2.0, 16000, rng), 10.0) / 8]
    if synth.speech_available():
        clips.insert(0, 0.8 * synth.synthesize_speech("The kettle is boiling in the kitchen.", voice="en+f3"))
    return clips


def _batch(clips):
    n = np.array([len(c) for c in clips])
    audio = np.zeros((len(clips), n.max()), np.float32)
    for i, c in enumerate(clips):
        audio[i, :len(c)] = c
    return audio, n


def test_fbank_jax_matches_seamless_m4t_feature_extractor():
    """The on-device float32 path, on speech and noisy events (pure tones: see test_fbank_numpy_...)."""
    clips = _clips()
    hf = SeamlessM4TFeatureExtractor()
    ref = hf(clips, sampling_rate=16000, return_tensors="np", padding=True)
    audio, n = _batch(clips)
    feats, mask = jax.jit(w2v_bert_features)(audio, n)
    assert feats.shape == ref["input_features"].shape and feats.shape[2] == 160
    np.testing.assert_array_equal(np.asarray(mask), ref["attention_mask"].astype(bool))
    diff = _maxdiff(feats, ref["input_features"])
    print(f"\n  fbank (JAX f32) vs SeamlessM4TFeatureExtractor: max|diff| {diff:.2e} over {feats.shape} "
          f"({'speech + ' if len(clips) == 3 else ''}events)")
    assert diff <= TOL
    # one clip alone (no padding) gives its own rows
    one, one_mask = w2v_bert_features(audio[-1:, :n[-1]])
    ref_one = hf(clips[-1], sampling_rate=16000, return_tensors="np")
    assert _maxdiff(one, ref_one["input_features"]) <= TOL
    np.testing.assert_array_equal(np.asarray(one_mask), ref_one["attention_mask"].astype(bool))


def test_fbank_numpy_matches_seamless_m4t_feature_extractor():
    """The float64 host path, on every synthetic event class (pure tones included) and speech."""
    rng = np.random.default_rng(0)
    clips = [0.125 * synth.synthesize_event(lab, 1.0 + 0.1 * i, 16000, rng) for i, lab in enumerate(synth.EVENT_LABELS)]
    clips += _clips()
    ref = SeamlessM4TFeatureExtractor()(clips, sampling_rate=16000, return_tensors="np", padding=True)
    feats, mask = w2v_bert_features_numpy(*_batch(clips))
    np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))
    diff = _maxdiff(feats, ref["input_features"])
    print(f"\n  fbank (numpy f64) vs SeamlessM4TFeatureExtractor: max|diff| {diff:.2e} over {feats.shape}")
    assert diff <= TOL


def test_fbank_frame_counts_and_errors():
    assert fbank_frames(16000) == 98 and fbank_frames(400) == 1 and fbank_frames(399) == 0
    np.testing.assert_array_equal(fbank_frames(np.array([0, 399, 400, 16000])), [0, 0, 1, 98])
    with pytest.raises(AudioError, match="samples"):
        w2v_bert_features(np.zeros((1, 300), np.float32))
    with pytest.raises(AudioError, match="batch"):
        w2v_bert_features(np.zeros(16000, np.float32))
    with pytest.raises(AudioError, match="samples"):
        w2v_bert_features_numpy(np.zeros((1, 300), np.float32))
    # ALARM's edge padding: 160 zeros each side make a 300-sample buffer long enough (2 fbank frames, 1 stacked)
    feats, mask = w2v_bert_features(np.ones((1, 300), np.float32), edge_pad=160)
    assert feats.shape == (1, 1, 160) and np.asarray(mask).tolist() == [[True]]
    for fn in (w2v_bert_features, w2v_bert_features_numpy):
        with pytest.raises(AudioError, match="edge_pad=-1"):
            fn(np.zeros((1, 16000), np.float32), edge_pad=-1)
