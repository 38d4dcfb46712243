"""CLAP (ClapModel) parity with `transformers` on tiny random checkpoints (float32): audio embeddings (unfused
with window padding and a bicubic time resize; fused with the AFF path on some rows), the audio tower's hidden
states, text embeddings with padding; strict import; the key table against HF's full-size layout (meta device);
and the host feature extractor vs `ClapFeatureExtractor` ("rand_trunc" and "fusion")."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import ClapConfig as HFClapConfig
from transformers import ClapModel as HFClapModel

from alm_jax.errors import AudioError, ConfigError, WeightImportError
from alm_jax.models.clap import ClapConfig, ClapModel, bicubic_matrix
from alm_jax.weights.clap_params import load_clap

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _hf_config(fusion: bool) -> HFClapConfig:
    # unfused: grid 8 -> 4 with window 3 (both stages pad to the window, stage 0 shifted);
    # fused: window 4 (stage 0 shifted, stage 1 = one window)
    audio = dict(spec_size=32, num_mel_bins=8, patch_size=4, patch_stride=4, window_size=4 if fusion else 3,
                 depths=[2, 2], num_attention_heads=[2, 4], patch_embeds_hidden_size=8, hidden_size=16,
                 enable_fusion=fusion, fusion_type="aff_2d" if fusion else None, aff_block_r=2)
    text = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=40)
    return HFClapConfig(text_config=text, audio_config=audio, projection_dim=12)


def save_tiny_clap(path, fusion: bool = False, seed: int = 0) -> HFClapModel:
    """A tiny HF CLAP checkpoint at `path`, every tensor perturbed (BN statistics too; variances kept > 0)."""
    torch.manual_seed(seed)
    model = HFClapModel(_hf_config(fusion)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.mul_(1 + 0.5 * torch.rand_like(b))
    model.save_pretrained(path)
    return model


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@nnx.jit
def _audio(model, feats, is_longer):
    return model.audio_embeds(feats, is_longer), model.audio(feats, is_longer)


@nnx.jit
def _text(model, ids, mask):
    return model.text_embeds(ids, mask)


def _hf_audio(hf, feats, is_longer=None):
    with torch.no_grad():
        kw = {} if is_longer is None else {"is_longer": torch.from_numpy(is_longer)}
        out = hf.get_audio_features(torch.from_numpy(feats), output_hidden_states=True, **kw)
    return out


@pytest.mark.parametrize("frames", [128, 100])
def test_audio_unfused_matches_transformers(tmp_path, frames):
    hf = save_tiny_clap(tmp_path, fusion=False)
    ours = load_clap(tmp_path)
    feats = np.random.default_rng(0).standard_normal((2, 1, frames, 8)).astype(np.float32)
    ref = _hf_audio(hf, feats)
    emb, out = _audio(ours, jnp.asarray(feats), None)
    assert emb.shape == (2, 12)
    diff = _maxdiff(emb, ref.pooler_output)
    # hidden states: HF's are [b, C, H, W]; ours tokens [b, H*W, C]
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    hs = [_maxdiff(np.asarray(o).reshape(r.shape[0], r.shape[2], r.shape[3], r.shape[1]),
                   r.permute(0, 2, 3, 1).numpy()) for o, r in zip(out.hidden_states, ref.hidden_states)]
    print(f"\n  clap audio (unfused, {frames} frames): embeds max|diff| {diff:.2e}, hidden states {max(hs):.2e}")
    assert diff <= TOL and max(hs) <= TOL
    assert all(_maxdiff(a, b) == 0 for a, b in zip(out.block_outputs, out.hidden_states[1:]))


def test_audio_fused_matches_transformers(tmp_path):
    hf = save_tiny_clap(tmp_path, fusion=True, seed=1)
    ours = load_clap(tmp_path)
    assert ours.config.audio.enable_fusion
    feats = np.random.default_rng(1).standard_normal((3, 4, 128, 8)).astype(np.float32)
    is_longer = np.array([[True], [False], [True]])
    ref = _hf_audio(hf, feats, is_longer)
    emb, _ = _audio(ours, jnp.asarray(feats), jnp.asarray(is_longer))
    diff = _maxdiff(emb, ref.pooler_output)
    # no row longer: the local crops must not matter
    ref0 = _hf_audio(hf, feats, np.zeros((3, 1), bool))
    emb0, _ = _audio(ours, jnp.asarray(feats), jnp.zeros((3, 1), bool))
    diff0 = _maxdiff(emb0, ref0.pooler_output)
    print(f"\n  clap audio (fused): embeds max|diff| {diff:.2e} (is_longer mixed), {diff0:.2e} (none longer)")
    assert diff <= TOL and diff0 <= TOL
    assert _maxdiff(emb[1], emb0[1]) <= 1e-6 and _maxdiff(emb[0], emb0[0]) > 1e-3


def test_text_matches_transformers(tmp_path):
    hf = save_tiny_clap(tmp_path)
    ours = load_clap(tmp_path)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 99, (3, 11)).astype(np.int64)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 1, 0          # right padding with pad_token_id
    ids[2, 4:], mask[2, 4:] = 1, 0
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    emb = _text(ours, jnp.asarray(ids), jnp.asarray(mask))
    diff = _maxdiff(emb, ref.pooler_output)
    print(f"\n  clap text: embeds max|diff| {diff:.2e}")
    assert emb.shape == (3, 12) and diff <= TOL
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-5)


def test_bfloat16_load_runs(tmp_path):
    """Frozen bf16 weights/compute: embeddings stay close to the float32 ones (cosine), both towers."""
    save_tiny_clap(tmp_path, fusion=True)
    f32, bf16 = load_clap(tmp_path), load_clap(tmp_path, dtype=jnp.bfloat16)
    assert bf16.audio_model.layers[0].blocks[0].attention.query.kernel[...].dtype == jnp.bfloat16
    feats = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 128, 8)), jnp.float32)
    longer = jnp.asarray([[True], [False]])
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 99, (2, 9)))
    for a, b in ((_audio(f32, feats, longer)[0], _audio(bf16, feats, longer)[0]),
                 (_text(f32, ids, None), _text(bf16, ids, None))):
        assert b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b)))
        assert float(jnp.min(jnp.sum(a * b, -1))) > 0.98


def test_bicubic_matrix_matches_torch():
    x = torch.randn(1, 1, 37, 5)
    ref = torch.nn.functional.interpolate(x, (64, 5), mode="bicubic", align_corners=True)
    ours = np.einsum("ot,bctf->bcof", bicubic_matrix(37, 64), x.numpy())
    assert _maxdiff(ours, ref) <= 1e-5


def test_strict_import_names_the_key(tmp_path):
    src = tmp_path / "src"
    save_tiny_clap(src, fusion=True)

    def variant(name, edit):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copy(src / "config.json", dst / "config.json")
        tensors = load_file(str(src / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
        return dst

    def missing(t):
        del t["audio_model.audio_encoder.layers.1.blocks.0.attention.self.relative_position_bias_table"]

    def missing_bn(t):
        del t["audio_model.audio_encoder.patch_embed.fusion_model.global_att.5.running_var"]

    def unexpected(t):
        t["text_model.encoder.layer.0.attention.self.extra.weight"] = np.zeros((16, 16), np.float32)

    def misshaped(t):
        key = "audio_model.audio_encoder.patch_embed.mel_conv2d.weight"
        t[key] = np.ascontiguousarray(t[key][..., :-1])

    with pytest.raises(WeightImportError, match=r"not found.*layers\.1\.blocks\.0\.attention\.relative_position_bias"):
        load_clap(variant("a", missing))
    with pytest.raises(WeightImportError, match=r"not found.*fusion_model\.global_bn2\.var"):
        load_clap(variant("a2", missing_bn))
    with pytest.raises(WeightImportError,
                       match=r"unexpected key 'text_model\.encoder\.layer\.0\.attention\.self\.extra\.weight'"):
        load_clap(variant("b", unexpected))
    with pytest.raises(WeightImportError, match=r"patch_embed\.mel_conv2d\.weight.*expects"):
        load_clap(variant("c", misshaped))
    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(ConfigError, match="channel_map"):
        ClapConfig.from_hf({**cfg, "audio_config": {**cfg["audio_config"], "fusion_type": "channel_map"}})
    with pytest.raises(ConfigError, match="model_type"):
        ClapConfig.from_hf({**cfg, "model_type": "whisper"})
    from alm_jax.sharding import make_mesh
    model = load_clap(src, mesh=make_mesh())
    with pytest.raises(AudioError, match="input_features"):
        model.audio_embeds(jnp.zeros((1, 1, 128, 8)))       # fused checkpoints take 4 channels
    # every parameter names logical axes that sharding.py knows
    from alm_jax.sharding import LOGICAL_AXES, _axes_of
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = _axes_of(var) or ()          # the scalar logit scales have axes ()
        assert len(axes) == var.get_value().ndim, path
        assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)


# ---- feature extractor --------------------------------------------------------------------------------

def _feature_clips():
    """48 kHz clips around a 1 s max_length: shorter (padded), longer, and the corner case (longer by < 1 hop)."""
    rng = np.random.default_rng(5)
    t = lambda n: np.arange(n) / 48000  # noqa: E731
    return [0.3 * np.sin(2 * np.pi * 440 * t(24_000)) + 0.01 * rng.standard_normal(24_000),
            0.1 * rng.standard_normal(81_600),
            0.2 * np.sin(2 * np.pi * 3000 * t(48_200)) * rng.standard_normal(48_200),
            0.05 * rng.standard_normal(30_000)]


@pytest.mark.parametrize("truncation,padding", [("rand_trunc", "repeatpad"), ("fusion", "repeatpad"),
                                                ("fusion", "repeat"), ("rand_trunc", "pad")])
def test_features_match_clap_feature_extractor(truncation, padding):
    from transformers import ClapFeatureExtractor

    from alm_jax.audio.clap_features import ClapFeatureSettings, clap_features
    clips = _feature_clips()
    hf = ClapFeatureExtractor()
    np.random.seed(7)
    ref = hf(clips, truncation=truncation, padding=padding, max_length=48_000, sampling_rate=48_000,
             return_tensors="np")
    settings = ClapFeatureSettings.from_hf(hf.to_dict())
    feats, longer = clap_features(clips, settings, truncation=truncation, padding=padding, max_length=48_000,
                                  rng=np.random.RandomState(7))
    assert feats.shape == ref["input_features"].shape == (4, 4 if truncation == "fusion" else 1, 101, 64)
    np.testing.assert_array_equal(longer, ref["is_longer"])
    diff = _maxdiff(feats, ref["input_features"])
    print(f"\n  clap features [{truncation}/{padding}] vs ClapFeatureExtractor: max|diff| {diff:.2e} dB")
    assert diff <= 1e-4
    # a batch with no longer clip: HF marks one random row longer; so do we, with the same draw
    np.random.seed(3)
    ref2 = hf(clips[:1], truncation=truncation, padding=padding, max_length=48_000, sampling_rate=48_000,
              return_tensors="np")
    _, longer2 = clap_features(clips[:1], settings, truncation=truncation, padding=padding, max_length=48_000,
                               rng=np.random.RandomState(3))
    np.testing.assert_array_equal(longer2, ref2["is_longer"])


@pytest.mark.parametrize("fusion", [False, True])
def test_full_size_key_table_covers_hf_layout(fusion):
    """HF's default (laion/clap-htsat-*) layout, built on the meta device: every tensor maps through the key
    table to a parameter of the full-size model with the right shape, and every parameter is filled."""
    import re

    from alm_jax.weights.clap_params import CLAP_IGNORE, CLAP_RULES
    from alm_jax.weights.hf_import import _path_str
    hf_cfg = HFClapConfig(audio_config=dict(enable_fusion=fusion))
    with torch.device("meta"):
        hf = HFClapModel(hf_cfg)
    cfg = ClapConfig.from_hf(hf_cfg.to_dict())
    abstract = nnx.eval_shape(lambda: ClapModel(cfg, rngs=nnx.Rngs(0)))
    want = {_path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    filled = set()
    for key, t in hf.state_dict().items():
        hits = [(r, g) for r in CLAP_RULES if (g := r.match(key)) is not None]
        if not hits:
            assert any(re.fullmatch(p, key) for p in CLAP_IGNORE), key
            continue
        assert len(hits) == 1, key
        rule, groups = hits[0]
        path = rule.target.format(*groups)
        shape = rule.transform(np.empty(tuple(t.shape), np.float32)).shape
        assert want.get(path) == shape, (key, path, shape, want.get(path))
        filled.add(path)
    assert filled == set(want)
