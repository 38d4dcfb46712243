"""Whisper encoder parity with `transformers` (float32, tiny random checkpoints) and strict import."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel

import alm_jax
from alm_jax.errors import AudioError, ConfigError, WeightImportError
from alm_jax.models.whisper import WhisperEncoderConfig
from alm_jax.sharding import make_mesh

TOL = 1e-4
LAYERS = 3


def _config(n_mels: int) -> WhisperConfig:
    return WhisperConfig(
        num_mel_bins=n_mels, d_model=64, encoder_layers=LAYERS, encoder_attention_heads=4, encoder_ffn_dim=96,
        max_source_positions=1500, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96,
        vocab_size=96, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)


def _save(path, n_mels: int, cls):
    """A tiny HF checkpoint with every tensor perturbed (biases, norms and positions non-trivial)."""
    torch.manual_seed(n_mels)
    model = cls(_config(n_mels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[(80, WhisperModel), (128, WhisperForConditionalGeneration)],
                ids=["80mel-WhisperModel", "128mel-ForConditionalGeneration"])
def checkpoint(request, tmp_path_factory):
    """(dir, torch encoder, our encoder); the 128-bin one uses the `model.encoder.*` key layout."""
    n_mels, cls = request.param
    path = tmp_path_factory.mktemp(f"whisper{n_mels}")
    hf = _save(path, n_mels, cls)
    torch_encoder = hf.get_encoder() if hasattr(hf, "get_encoder") else hf.encoder
    return path, torch_encoder, alm_jax.load_whisper_encoder(path)


@nnx.jit
def _run(encoder, feats):
    return encoder(feats)


def _torch_reference(enc, feats: np.ndarray):
    """HF's encoder submodules run by hand on any input length, positions sliced to it.
    Returns (hidden_states with HF indexing, raw block outputs)."""
    with torch.no_grad():
        x = torch.nn.functional.gelu(enc.conv1(torch.from_numpy(feats)))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        hidden, blocks = [x], []
        for layer in enc.layers:
            x = layer(x, None)
            blocks.append(x)
            hidden.append(x)
        hidden[-1] = enc.layer_norm(x)
    return [h.numpy() for h in hidden], [b.numpy() for b in blocks]


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _features(n_mels: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, n_mels, frames)).astype(np.float32)


def test_padded_30s_every_hidden_state_matches_hf(checkpoint):
    _, torch_enc, enc = checkpoint
    feats = _features(enc.config.num_mel_bins, 3000)
    with torch.no_grad():
        ref = torch_enc(torch.from_numpy(feats), output_hidden_states=True)
    out = _run(enc, feats)
    assert out.last_hidden_state.shape == (2, 1500, 64)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert _maxdiff(ours, theirs) <= TOL, f"hidden_states[{i}]"
    assert _maxdiff(out.last_hidden_state, ref.last_hidden_state) <= TOL
    # transformers 5 ties hidden_states[-1] to the final-LayerNorm output; we do the same
    assert torch.equal(ref.hidden_states[-1], ref.last_hidden_state)

    # raw block outputs: equal to HF hidden_states[i + 1] except the last (which HF shows after the final LN)
    ref_hidden, ref_blocks = _torch_reference(torch_enc, feats)
    for i in range(LAYERS):
        assert _maxdiff(out.block_outputs[i], ref_blocks[i]) <= TOL, f"block_outputs[{i}]"
    for i in range(LAYERS - 1):
        assert _maxdiff(out.block_outputs[i], ref.hidden_states[i + 1]) <= TOL
    assert _maxdiff(out.block_outputs[-1], ref.last_hidden_state) > 0.1
    # the hand-run reference itself agrees with HF on the padded input (it is valid for trimmed input)
    for ours, theirs in zip(ref_hidden, ref.hidden_states):
        assert _maxdiff(ours, theirs) <= 1e-5


@pytest.mark.parametrize("frames", [200, 731])
def test_trimmed_input_matches_hf_submodules(checkpoint, frames):
    _, torch_enc, enc = checkpoint
    feats = _features(enc.config.num_mel_bins, frames, seed=frames)
    ref_hidden, ref_blocks = _torch_reference(torch_enc, feats)
    out = _run(enc, feats)
    assert out.last_hidden_state.shape == (2, (frames + 1) // 2, 64)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref_hidden, strict=True)):
        assert _maxdiff(ours, theirs) <= TOL, f"hidden_states[{i}]"
    for i, (ours, theirs) in enumerate(zip(out.block_outputs, ref_blocks, strict=True)):
        assert _maxdiff(ours, theirs) <= TOL, f"block_outputs[{i}]"


def test_input_errors(checkpoint):
    _, _, enc = checkpoint
    n_mels = enc.config.num_mel_bins
    with pytest.raises(AudioError, match="at most 3000"):
        enc.embed(jnp.zeros((1, n_mels, 3002)))
    with pytest.raises(AudioError, match=f"{n_mels}, frames"):
        enc.embed(jnp.zeros((1, n_mels + 1, 100)))


def test_load_on_mesh_and_in_bfloat16(checkpoint):
    path, _, enc = checkpoint
    feats = _features(enc.config.num_mel_bins, 400, seed=3)
    want = _run(enc, feats).last_hidden_state
    mesh = make_mesh(data=1, fsdp=-1)
    sharded = alm_jax.load_whisper_encoder(path, mesh=mesh)
    spec = sharded.layers.fc1.kernel[...].sharding.spec    # scanned: [layers, audio_embed, audio_mlp]
    assert spec[0] is None and spec[1] == "fsdp"  # audio_embed -> fsdp (really split when several devices are visible)
    assert _maxdiff(_run(sharded, feats).last_hidden_state, want) <= 1e-5
    half = alm_jax.load_whisper_encoder(path, dtype=jnp.bfloat16)
    assert half.layers.fc1.kernel[...].dtype == jnp.bfloat16
    got = _run(half, feats).last_hidden_state
    assert got.dtype == jnp.bfloat16 and _maxdiff(got, want) < 0.1


def test_unrolled_equals_scanned_and_keep_runs_only_the_tapped_blocks(checkpoint):
    path, _, scanned = checkpoint
    unrolled = alm_jax.load_whisper_encoder(path, scan_layers=False)
    assert isinstance(unrolled.layers, nnx.List) and len(unrolled.layers) == LAYERS
    assert scanned.layers.fc1.kernel.shape == (LAYERS, *unrolled.layers[0].fc1.kernel.shape)
    np.testing.assert_array_equal(np.asarray(scanned.layers.fc2.bias[...][1]),
                                  np.asarray(unrolled.layers[1].fc2.bias[...]))
    feats = _features(scanned.config.num_mel_bins, 200, seed=5)
    full, loop = _run(scanned, feats), _run(unrolled, feats)
    for ours, theirs in zip(full.hidden_states + full.block_outputs, loop.hidden_states + loop.block_outputs,
                            strict=True):
        assert _maxdiff(ours, theirs) <= 1e-5
    for enc in (scanned, unrolled):
        out = nnx.jit(lambda e, f: e(f, keep=(0,)))(enc, feats)
        assert out.last_hidden_state is None and out.hidden_states[-1] is None
        assert all(b is None for b in out.block_outputs[1:]) and out.hidden_states[2:] == (None,) * (LAYERS - 1)
        assert _maxdiff(out.block_outputs[0], full.block_outputs[0]) <= 1e-5
        assert _maxdiff(out.hidden_states[1], full.block_outputs[0]) <= 1e-5
    with pytest.raises(ConfigError, match=r"keep=\(3,\) names blocks outside 0\.\.2"):
        scanned(feats, keep=(3,))


# ---- strict import ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_plain")
    _save(path, 80, WhisperModel)
    return path


def _variant(src, dst, edit):
    """Copies the checkpoint at `src` to `dst` with `edit(tensors)` applied to its state dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_renamed_key_is_named(plain_dir, tmp_path):
    def edit(t):
        t["encoder.layers.1.fc_1.weight"] = t.pop("encoder.layers.1.fc1.weight")
    with pytest.raises(WeightImportError, match=r"encoder\.layers\.1\.fc_1\.weight"):
        alm_jax.load_whisper_encoder(_variant(plain_dir, tmp_path / "v", edit))


def test_missing_key_is_named(plain_dir, tmp_path):
    def edit(t):
        del t["encoder.layer_norm.bias"]
    with pytest.raises(WeightImportError, match=r"layer_norm\.bias"):
        alm_jax.load_whisper_encoder(_variant(plain_dir, tmp_path / "v", edit))


@pytest.mark.parametrize("key", ["encoder.layers.0.self_attn.k_proj.bias", "encoder.extra.weight",
                                 "encoder.layers.7.fc1.bias"])
def test_extra_key_is_named(plain_dir, tmp_path, key):
    def edit(t):
        t[key] = np.zeros((64,), np.float32)
    with pytest.raises(WeightImportError, match=key.replace(".", r"\.")):
        alm_jax.load_whisper_encoder(_variant(plain_dir, tmp_path / "v", edit))


@pytest.mark.parametrize("key", ["encoder.conv1.weight", "encoder.layers.2.fc2.weight"])
def test_wrong_shape_is_named(plain_dir, tmp_path, key):
    def edit(t):
        t[key] = np.ascontiguousarray(t[key][:-1])
    with pytest.raises(WeightImportError, match=key.replace(".", r"\.") + ".*expects"):
        alm_jax.load_whisper_encoder(_variant(plain_dir, tmp_path / "v", edit))


@pytest.mark.parametrize("key,target", [("conv1.bias", "conv1.bias"), ("layers.1.fc1.bias", "layers.1.fc1.bias")])
def test_both_prefixes_at_once_is_a_duplicate(plain_dir, tmp_path, key, target):
    """Also for one slice of a stacked (scanned) parameter: each layer's slice is filled once."""
    def edit(t):
        t[f"model.encoder.{key}"] = t[f"encoder.{key}"].copy()
    with pytest.raises(WeightImportError, match=rf"fills '{target}', already filled"):
        alm_jax.load_whisper_encoder(_variant(plain_dir, tmp_path / "v", edit))


def test_config_errors(plain_dir):
    cfg = json.loads((plain_dir / "config.json").read_text())
    assert WhisperEncoderConfig.from_hf(cfg).max_frames == 3000
    with pytest.raises(ConfigError, match="encoder_layers"):
        WhisperEncoderConfig.from_hf({k: v for k, v in cfg.items() if k != "encoder_layers"})
    with pytest.raises(ConfigError, match="not divisible"):
        WhisperEncoderConfig.from_hf({**cfg, "encoder_attention_heads": 5})
