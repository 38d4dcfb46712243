"""The `qwen2_audio` connector kind and the `qwen2-audio` export format: token counts equal to Qwen2-Audio's,
the connector against torch's AvgPool1d + LayerNorm + Linear, a tiny ALM overfitting with it, and a trained
run (LoRA rank 2 with non-zero B) exported and loaded by transformers' `Qwen2AudioForConditionalGeneration`
and `Qwen2AudioProcessor`, whose logits on a 30 s clip + text equal ours. Also: the refusals (a DeSTA run,
trimmed audio, hf tap indexing, other LLMs), and the known difference for clips shorter than the window
(Qwen2-Audio masks the encoder's padded keys; our encoder does not)."""

from __future__ import annotations

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.config import ConnectorConfig, EncoderConfig, load_config
from alm_jax.errors import ConfigError
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.models.connectors import CONNECTORS, EncoderInfo, connector_token_rule
from alm_jax.models.connectors.qwen2_audio import PooledTokenRule, Qwen2AudioConnector
from alm_jax.models.lora import lora_layers, lora_per_layer

SR = 16000
WINDOW = 30 * SR
TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _hf_lengths(n: int) -> tuple[int, int]:
    """Qwen2-Audio's (valid encoder positions, audio tokens) for a clip of n samples: WhisperFeatureExtractor's
    feature_attention_mask (as Qwen2AudioProcessor calls it), then `_get_feat_extract_output_lengths`."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    fe = WhisperFeatureExtractor(feature_size=80)
    mask = fe(np.zeros(n, np.float32), sampling_rate=SR, padding="max_length", return_attention_mask=True,
              return_tensors="pt")["attention_mask"]
    positions, tokens = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, mask.sum(-1))
    return int(positions[0]), int(tokens[0])


def _hf_count(n: int) -> int:
    return _hf_lengths(n)[1]


# ---------------------------------------------------------------------------------------------- connector


def test_token_rule_counts_like_qwen2_audio():
    rule = connector_token_rule(ConnectorConfig(kind="qwen2_audio"), (EncoderConfig(),))
    assert isinstance(rule, PooledTokenRule) and CONNECTORS["qwen2_audio"] is Qwen2AudioConnector
    lengths = [1, 159, 160, 161, 320, 321, 479, 480, 481, 8000, 16000, 16001, 16161, 23999, WINDOW - 1, WINDOW,
               WINDOW + 5000]
    hf = [_hf_lengths(n) for n in lengths]
    want = [t for _, t in hf]
    assert [rule(n) for n in lengths] == want
    assert [rule.positions(n) for n in lengths] == [p for p, _ in hf]
    assert want[lengths.index(16000)] == 25 and want[lengths.index(WINDOW)] == 750
    np.testing.assert_array_equal(rule(np.asarray(lengths)), want)
    np.testing.assert_array_equal(np.asarray(rule(jnp.asarray(lengths, jnp.int32))), want)


def test_connector_matches_torch_pool_norm_linear():
    d, llm_dim = 12, 20
    conn = Qwen2AudioConnector(ConnectorConfig(kind="qwen2_audio"),
                               [EncoderInfo(dim=d, taps=(2,), n_entries=3)], llm_dim, rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    conn.norm.scale[...] = jnp.asarray(1 + 0.3 * r.standard_normal(d), jnp.float32)
    conn.norm.bias[...] = jnp.asarray(0.3 * r.standard_normal(d), jnp.float32)
    conn.proj.bias[...] = jnp.asarray(0.3 * r.standard_normal(llm_dim), jnp.float32)
    frames = 15                                   # odd: the pool drops the last row, as torch does
    states = [jnp.asarray(r.standard_normal((2, frames, d)), jnp.float32) for _ in range(3)]
    samples = jnp.asarray([frames * 320, 1600], jnp.int32)   # 15 positions -> 7 tokens; 5 positions -> 2
    out = np.asarray(conn([states], samples))
    assert out.shape == (2, frames // 2, llm_dim)
    pool, ln, lin = torch.nn.AvgPool1d(2, stride=2), torch.nn.LayerNorm(d), torch.nn.Linear(d, llm_dim)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor(np.asarray(conn.norm.scale[...])))
        ln.bias.copy_(torch.tensor(np.asarray(conn.norm.bias[...])))
        lin.weight.copy_(torch.from_numpy(np.asarray(conn.proj.kernel[...]).T.copy()))
        lin.bias.copy_(torch.tensor(np.asarray(conn.proj.bias[...])))
        x = torch.tensor(np.asarray(states[2]))
        ref = lin(ln(pool(x.permute(0, 2, 1)).permute(0, 2, 1))).numpy()
    counts = [int(c) for c in conn.rule(samples)]
    assert counts == [7, 2]
    for n, c in enumerate(counts):
        assert _maxdiff(out[n, :c], ref[n, :c]) < 1e-5
        assert not out[n, c:].any()


def test_connector_refuses_other_encoder_setups():
    from test_alm import tiny_encoder, tiny_llm
    cc = ConnectorConfig(kind="qwen2_audio")
    blocks = EncoderConfig(taps=(-1,), tap_indexing="blocks", pad_to_seconds=None)
    with pytest.raises(ConfigError, match="one Whisper encoder"):
        AudioLanguageModel([tiny_encoder(), tiny_encoder(seed=2)], tiny_llm(), cc, [blocks, blocks], rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="taps=\\[-1\\]"):
        AudioLanguageModel([tiny_encoder()], tiny_llm(), cc, [EncoderConfig(taps=(0,), pad_to_seconds=None)],
                           rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="input_convention='alarm'.*set it to native"):   # Qwen2-Audio's own frames
        AudioLanguageModel([tiny_encoder()], tiny_llm(), cc, [EncoderConfig(taps=(-1,), pad_to_seconds=None,
                                                                            input_convention="alarm")],
                           rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_tiny_alm_overfits_a_batch_with_the_qwen2_audio_connector():
    from test_alm import make_batch, overfit, tiny_encoder, tiny_llm
    model = AudioLanguageModel([tiny_encoder()], tiny_llm(), ConnectorConfig(kind="qwen2_audio"),
                               [EncoderConfig(taps=(-1,), tap_indexing="blocks", pad_to_seconds=None)],
                               rngs=nnx.Rngs(10))
    assert model.num_audio_tokens(8000) == _hf_count(8000) == 12
    batch = make_batch(model, [np.zeros(8000, np.float32)], [[3]])
    assert int((batch["audio_clip"] >= 0).sum()) == 12
    losses = overfit(model)   # a LayerNorm + Linear on frozen tiny features: 4.6 -> 0.23 measured in 300 steps
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"


# ---------------------------------------------------------------------------------------------- export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _tiny_dirs(root, tokenizer_dir):
    """A tiny tied Qwen2 over the SmolLM2 vocabulary (49152 rows: the three Qwen2-Audio tokens the export
    adds do not fit, so it pads) with the SmolLM2 tokenizer, and a tiny Whisper with the 1500 positions of a
    30 s window; every weight perturbed."""
    from hf_tiny_llm import save, tiny_hf_llm
    from transformers import WhisperConfig, WhisperModel
    llm_dir, wh_dir = root / "llm", root / "whisper"
    save(tiny_hf_llm("qwen2", tied=True, vocab_size=49152, hidden_size=32, intermediate_size=48,
                     max_position_embeddings=1024), llm_dir)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, llm_dir / f)
    torch.manual_seed(1)
    wh = WhisperModel(WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                                    max_source_positions=1500, max_target_positions=16, vocab_size=50,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    with torch.no_grad():
        for name, p in wh.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
    wh.save_pretrained(wh_dir)
    return llm_dir, wh_dir


def _config(llm_dir, wh_dir, run_dir, *extra):
    return load_config(None, [
        f"model.llm={llm_dir}", f"model.encoders.0.path={wh_dir}", "model.encoders.0.taps=[-1]",
        "model.encoders.0.tap_indexing=blocks", "model.encoders.0.pad_to_seconds=30",
        "model.connector.kind=qwen2_audio", f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.async_save=false",
        f"logging.dir={run_dir}", *extra])


def _save_run(cfg, step: int = 7):
    """A checkpoint as `alm train` writes it, with a random connector (LayerNorm too) and non-zero LoRA B."""
    from alm_jax.config import to_dict
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    model = build_alm(cfg.model, seed=3)
    r = np.random.default_rng(5)
    for path, var in nnx.to_flat_state(nnx.state(model.connector, nnx.Param)):
        base = 1.0 if path[-1] == "scale" else 0.0
        var[...] = jnp.asarray(base + 0.3 * r.standard_normal(var.shape), var.dtype)
    for _, layer in lora_layers(model.llm):
        layer.lora_b[...] = jnp.asarray(0.2 * r.standard_normal(layer.lora_b.shape), jnp.float32)
    save_trained(model, cfg.checkpoint.dir, step, to_dict(cfg))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_models):
    """(run, export dir, files written) for a qwen2_audio run with LoRA rank 2 on q/v."""
    from alm_jax.export import formats
    from alm_jax.export.source import load_run
    root = tmp_path_factory.mktemp("qwen2-audio")
    llm_dir, wh_dir = _tiny_dirs(root, demo_models.llm)
    cfg = _config(llm_dir, wh_dir, root / "run", "model.lora.rank=2", "model.lora.alpha=4")
    _save_run(cfg)
    run = load_run(cfg.checkpoint.dir)
    assert len(lora_per_layer(run.model.llm)) == 4      # q/v x 2 layers (two stacked wrappers)
    out = root / "export"
    files = formats.export(run, "qwen2-audio", out)
    return run, out, files


def _waves(seconds: float, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t) * np.sin(2 * np.pi * 0.7 * t)
            + 0.05 * r.standard_normal(t.size)).astype(np.float32)


def _processor_inputs(out, wave, prompt="<|AUDIO|> What is this sound?"):
    from transformers import Qwen2AudioProcessor
    proc = Qwen2AudioProcessor.from_pretrained(out)
    text = proc.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                    add_generation_prompt=True)
    return proc, proc(text=text, audio=[wave], sampling_rate=SR, return_tensors="pt")


def _our_logits(run, ids: np.ndarray, audio_id: int, wave: np.ndarray) -> np.ndarray:
    """Our model's logits for one row: `ids` with the <|AUDIO|> positions taken by the clip's tokens."""
    audio_at = ids == audio_id
    clip = np.where(audio_at, 0, -1).astype(np.int32)
    pos = np.where(audio_at, np.cumsum(audio_at) - 1, -1).astype(np.int32)
    batch = {"input_ids": np.where(audio_at, 0, ids)[None].astype(np.int32), "audio_clip": clip[None],
             "audio_pos": pos[None], "attention_mask": np.ones((1, ids.size), np.int32),
             "audio": wave[None], "audio_samples": np.asarray([wave.size], np.int32)}
    graphdef, state = nnx.split(run.model)
    fwd = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
    return np.asarray(fwd(state, {k: jnp.asarray(v) for k, v in batch.items()}))[0]


def test_export_writes_real_qwen2_audio_names_and_config(exported):
    from safetensors import safe_open
    run, out, files = exported
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
            "generation_config.json"} <= set(files)
    assert all((out / f).is_file() for f in files)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("language_model.model.embed_tokens.weight").shape == (49155, 32)
        np.testing.assert_array_equal(f.get_tensor("language_model.lm_head.weight"),
                                      f.get_tensor("language_model.model.embed_tokens.weight"))
    assert {"audio_tower.layer_norm.weight", "audio_tower.conv1.weight", "audio_tower.embed_positions.weight",
            "audio_tower.layers.1.self_attn.k_proj.weight", "multi_modal_projector.linear.weight",
            "multi_modal_projector.linear.bias", "language_model.model.layers.1.self_attn.q_proj.bias",
            "language_model.model.norm.weight", "language_model.lm_head.weight"} <= keys
    assert not any("lora" in k or ".base." in k for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_audio" and config["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    assert config["audio_token_index"] == 49152 and config["text_config"]["vocab_size"] == 49155
    assert config["audio_config"]["max_source_positions"] == 1500 and config["audio_config"]["d_model"] == 16


def test_bfloat16_sharded_export_loads(exported, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen2AudioForConditionalGeneration

    from alm_jax.export import formats
    run, out, _ = exported
    files = formats.export(run, "qwen2-audio", tmp_path, dtype="bfloat16", max_shard_bytes=2_000_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    with safe_open(str(tmp_path / shards[0]), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf, info = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.model.audio_tower.conv1.weight.dtype == torch.bfloat16


def test_untied_head_is_padded_with_mean_rows():
    from test_alm import VOCAB, tiny_llm

    from alm_jax.export.qwen2_audio import llm_tensors
    llm = tiny_llm()
    assert not llm.cfg.tie_word_embeddings
    tensors = dict(llm_tensors(llm, VOCAB + 3))
    head, embed = tensors["language_model.lm_head.weight"], tensors["language_model.model.embed_tokens.weight"]
    np.testing.assert_array_equal(head[:VOCAB], np.asarray(llm.lm_head.kernel[...]).T)
    np.testing.assert_allclose(head[VOCAB:], np.broadcast_to(head[:VOCAB].mean(0), (3, head.shape[1])), rtol=1e-6)
    np.testing.assert_array_equal(embed[:VOCAB], np.asarray(llm.embed_tokens.embedding[...]))
    assert embed.shape == (VOCAB + 3, llm.cfg.hidden_size)
    assert sum(k.endswith("lm_head.weight") for k in tensors) == 1


def test_transformers_loads_the_export_and_its_logits_equal_ours(exported):
    from transformers import Qwen2AudioForConditionalGeneration
    run, out, _ = exported
    hf, info = Qwen2AudioForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    wave = _waves(30.0)                              # fills the window: Qwen2-Audio masks no encoder key
    proc, inputs = _processor_inputs(out, wave)
    ids = inputs["input_ids"][0].numpy()
    audio_id = hf.config.audio_token_index
    assert proc.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == audio_id
    assert int((ids == audio_id).sum()) == run.model.num_audio_tokens(wave.size) == 750
    with torch.no_grad():
        theirs = hf(**inputs).logits[0].float().numpy()
    ours = _our_logits(run, ids, audio_id, wave)
    assert theirs.shape == (ids.size, 49155) and ours.shape == (ids.size, 49152)
    diff = _maxdiff(ours, theirs[:, :49152])
    print(f"qwen2-audio export: max |logit diff| = {diff:.2e} over {ids.size} positions")
    assert diff <= TOL
    # text only: the LLM alone agrees, and without its LoRA branch ours would not (the update is exported)
    text_only = np.where(ids == audio_id, 0, ids)[None]
    with torch.no_grad():
        hf_text = hf(input_ids=torch.from_numpy(text_only)).logits[0, :, :49152].float().numpy()
    assert _maxdiff(np.asarray(run.model.llm(jnp.asarray(text_only, jnp.int32)))[0], hf_text) <= TOL
    layers = [layer for _, layer in lora_layers(run.model.llm)]
    for layer in layers:
        layer.merged = True         # skips the LoRA branch (the base kernels are untouched)
    try:
        no_lora = np.asarray(run.model.llm(jnp.asarray(text_only, jnp.int32)))[0]
    finally:
        for layer in layers:
            layer.merged = False
    assert _maxdiff(no_lora, hf_text) > 10 * TOL


def test_exported_processor_renders_prompts_as_the_run_was_trained(exported):
    from transformers import AutoTokenizer

    from alm_jax.data.templates import ChatTokenizer
    run, out, _ = exported
    wave = _waves(1.3, seed=1)
    proc, inputs = _processor_inputs(out, wave)
    ids = inputs["input_ids"][0].numpy()
    audio_id = proc.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ours = ChatTokenizer(AutoTokenizer.from_pretrained(run.cfg.model.llm)).encode(
        [{"role": "user", "content": "<audio> What is this sound?"}], [run.model.num_audio_tokens(wave.size)])
    np.testing.assert_array_equal(ids == audio_id, ours.audio_clip >= 0)
    np.testing.assert_array_equal(ids[ids != audio_id], ours.ids[ours.audio_clip < 0])
    # list contents (the processor chat format) render the same string
    listed = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "audio", "path": "x.wav"}, {"type": "text", "text": " What is this sound?"}]}],
        tokenize=False, add_generation_prompt=True)
    plain = proc.apply_chat_template([{"role": "user", "content": "<|AUDIO|> What is this sound?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert listed == plain
    # the extractor's 30 s log-mel is the one our encoder computes on device
    from alm_jax.audio.features import log_mel
    feats = log_mel(jnp.asarray(wave[None]), n_mels=80, pad_to_seconds=30.0)
    assert _maxdiff(feats, inputs["input_features"].numpy()) < 1e-4


def test_short_clip_logits_equal_ours(exported):
    from transformers import Qwen2AudioForConditionalGeneration
    run, out, _ = exported
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    wave = _waves(1.3, seed=1)
    _, inputs = _processor_inputs(out, wave)
    ids = inputs["input_ids"][0].numpy()
    with torch.no_grad():
        theirs = hf(**inputs).logits[0].float().numpy()
    diff = _maxdiff(_our_logits(run, ids, hf.config.audio_token_index, wave), theirs[:, :49152])
    print(f"qwen2-audio export, 1.3 s clip: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------- refusals


def _fake_run(cfg, llm_type="qwen2", positions=1500):
    llm = types.SimpleNamespace(cfg=types.SimpleNamespace(model_type=llm_type))
    enc = types.SimpleNamespace(config=types.SimpleNamespace(max_source_positions=positions))
    return types.SimpleNamespace(cfg=cfg, model=types.SimpleNamespace(llm=llm, encoders=[enc]))


def test_unsupported_names_what_qwen2_audio_needs(tmp_path):
    from alm_jax.export.qwen2_audio import unsupported
    cfg = _config("llm", "whisper", tmp_path)
    assert unsupported(_fake_run(cfg)) is None
    cases = {
        "the connector is 'alarm'": _fake_run(_config("l", "w", tmp_path, "model.connector.kind=alarm")),
        "the encoders are ['whisper', 'whisper']": _fake_run(_config(
            "l", "w", tmp_path, "model.encoders=[{path: w, taps: [-1]}, {path: w2, taps: [-1]}]")),
        "the LLM is a 'llama' model": _fake_run(cfg, llm_type="llama"),
        "tap_indexing='hf'": _fake_run(_config("l", "w", tmp_path, "model.encoders.0.tap_indexing=hf")),
        "pad_to_seconds=None": _fake_run(_config("l", "w", tmp_path, "model.encoders.0.pad_to_seconds=null")),
        "max_source_positions=100": _fake_run(cfg, positions=100),
    }
    for want, run in cases.items():
        why = unsupported(run)
        assert why is not None and want in why, (want, why)


def test_a_desta_run_refuses_qwen2_audio_and_names_the_formats_that_can(exported, tmp_path):
    from alm_jax.export import formats
    from alm_jax.export.source import load_run
    for fmt in formats.FORMATS.values():
        pytest.importorskip(fmt, reason=f"{fmt} is not written yet")
    run = exported[0]
    cfg = _config(run.cfg.model.llm, run.cfg.model.encoders[0].path, tmp_path, "model.connector.kind=desta",
                  "model.connector.num_queries=2", "model.connector.num_layers=1", "model.connector.num_heads=2",
                  "model.connector.hidden=16", "model.connector.intermediate=32")
    _save_run(cfg)
    desta = load_run(cfg.checkpoint.dir)
    with pytest.raises(ConfigError) as e:
        formats.export(desta, "qwen2-audio", tmp_path / "out")
    msg = str(e.value)
    assert ("cannot export this run as 'qwen2-audio': the connector is 'desta'; qwen2-audio needs one Whisper "
            "encoder + the qwen2_audio connector + a Qwen2 LLM") in msg
    can = msg.split("Formats that can: ")[1].split(", ")
    assert "qwen2-audio" not in can and "bundle" in can
    assert not (tmp_path / "out").exists()
