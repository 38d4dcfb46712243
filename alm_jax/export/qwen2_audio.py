"""Format `qwen2-audio`: a run of one Whisper encoder + the `qwen2_audio` connector + a Qwen2 LLM, written as a
Hugging Face Qwen2-Audio directory that `Qwen2AudioForConditionalGeneration.from_pretrained(out)` and
`Qwen2AudioProcessor.from_pretrained(out)` load.

    out/config.json                Qwen2AudioConfig: audio_config from the Whisper encoder, text_config from the
                                   LLM's config.json, audio_token_index = the id of <|AUDIO|>
    out/model.safetensors          (or shards + index) under the names real Qwen2-Audio checkpoints use:
                                     audio_tower.*              the frozen Whisper encoder's conv stem, positions,
                                                                blocks; audio_tower.layer_norm = the connector's
                                                                LayerNorm (Whisper's own final LayerNorm is dropped)
                                     multi_modal_projector.linear.*   the connector's Linear
                                     language_model.model.*, language_model.lm_head.weight   the LLM, LoRA merged
    out/preprocessor_config.json   WhisperFeatureExtractor (the encoder's mel bins, 30 s window)
    out/tokenizer files, chat template, processor config, generation_config.json (the LLM's, if it has one)

What the model computes maps one to one: Qwen2AudioEncoder = Whisper conv stem + positions + blocks, then
AvgPool1d(2, 2), then `audio_tower.layer_norm`; the projector; the Qwen2 decoder with the audio features
written over the `<|AUDIO|>` positions. Our side does the same (`models/connectors/qwen2_audio.py`) on the
30 s-padded log-mel, which is why the encoder must run with `pad_to_seconds: 30` (Qwen2-Audio's extractor
pads every clip to 30 s; a trimmed-audio run is refused). The processor expands each `<|AUDIO|>` into
floor(ceil(L / 2) / 2) tokens, L = valid mel frames, the count our `PooledTokenRule` reserves in training.

Padding: Qwen2-Audio masks its encoder's self-attention keys past a clip's valid positions; so does our
encoder under this connector (`Qwen2AudioConnector.encoder_valid_positions` -> `WhisperEncoder(...,
valid_positions=)`), so short clips agree as well as full 30 s ones (tests/test_export_qwen2_audio.py).

Tokenizer: `<|AUDIO|>`, `<|audio_bos|>`, `<|audio_eos|>` are added as special tokens when the LLM's tokenizer
lacks them. When that makes the tokenizer longer than the LLM's embedding table (real Qwen2 tables are
padded to 151936 rows, so this does not happen for them), the embedding and the LM head are padded to the
tokenizer's length with new rows equal to the mean of the existing rows (text_config.vocab_size grows
with them): the new ids never reach the LLM as embeddings (audio features replace `<|AUDIO|>`, and the
exported chat template does not emit the bos/eos markers), and a mean head row scores like an average token.

Chat template: the LLM's own template, preceded by a step that turns list contents
(`[{"type": "audio", ...}, {"type": "text", "text": ...}]`) into one string with `<|AUDIO|>` where each clip
goes, so prompts render exactly as the run was trained (`<audio>` placeholders become `<|AUDIO|>`; no
"Audio 1:" prefix or audio bos/eos markers around the clip). String contents may hold `<|AUDIO|>` directly.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.export.llm import hf_name, merged_tensors
from alm_jax.export.source import TrainedRun, host_tensors
from alm_jax.export.writer import ShardedSafetensorsWriter
from alm_jax.weights.alm_params import DTYPES
from alm_jax.weights.hf_import import identity, read_config, transpose

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
WINDOW_SECONDS = 30.0          # Qwen2-Audio's feature extractor window
SOURCE_POSITIONS = 1500        # ... = the encoder's position table (3000 mel frames / 2)
NEEDS = "qwen2-audio needs one Whisper encoder + the qwen2_audio connector + a Qwen2 LLM"
GENERATION_FILES = ("generation_config.json",)


def conv_weight(x: np.ndarray) -> np.ndarray:
    """Our Conv1d kernel `[width, in, out]` -> torch Conv1d weight `[out, in, width]`."""
    return np.transpose(x, (2, 1, 0))


_L = r"layers\.(\d+)\."
# Our WhisperEncoder state path (full match) -> Qwen2-Audio key (under audio_tower.) and the transform.
# The encoder's own final `layer_norm` has no counterpart (None): Qwen2-Audio's is the connector's.
ENCODER_TO_HF: tuple[tuple[str, str | None, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"(conv1|conv2)\.kernel", "{0}.weight", conv_weight),
    (r"(conv1|conv2)\.bias", "{0}.bias", identity),
    (r"embed_positions", "embed_positions.weight", identity),
    (_L + r"attn\.(q_proj|k_proj|v_proj|out_proj)\.kernel", "layers.{0}.self_attn.{1}.weight", transpose),
    (_L + r"attn\.(q_proj|v_proj|out_proj)\.bias", "layers.{0}.self_attn.{1}.bias", identity),
    (_L + r"attn_norm\.scale", "layers.{0}.self_attn_layer_norm.weight", identity),
    (_L + r"attn_norm\.bias", "layers.{0}.self_attn_layer_norm.bias", identity),
    (_L + r"(fc1|fc2)\.kernel", "layers.{0}.{1}.weight", transpose),
    (_L + r"(fc1|fc2)\.bias", "layers.{0}.{1}.bias", identity),
    (_L + r"mlp_norm\.scale", "layers.{0}.final_layer_norm.weight", identity),
    (_L + r"mlp_norm\.bias", "layers.{0}.final_layer_norm.bias", identity),
    (r"layer_norm\.(scale|bias)", None, identity),
)
# Our Qwen2AudioConnector state path -> full Qwen2-Audio key.
CONNECTOR_TO_HF: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "norm.scale": ("audio_tower.layer_norm.weight", identity),
    "norm.bias": ("audio_tower.layer_norm.bias", identity),
    "proj.kernel": ("multi_modal_projector.linear.weight", transpose),
    "proj.bias": ("multi_modal_projector.linear.bias", identity),
}

# Prepended to the LLM's chat template: list contents -> one string, audio items -> <|AUDIO|>.
_CONTENT_TO_TEXT = (
    "{%- set _alm = namespace(messages=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string -%}"
    "{%- set _alm.messages = _alm.messages + [_m] -%}"
    "{%- else -%}"
    "{%- set _alm_text = namespace(s='') -%}"
    "{%- for _c in _m['content'] -%}"
    "{%- if _c is string -%}"
    "{%- set _alm_text.s = _alm_text.s + _c -%}"
    "{%- elif _c.get('type') == 'audio' or 'audio' in _c or 'audio_url' in _c -%}"
    "{%- set _alm_text.s = _alm_text.s + '" + AUDIO_TOKEN + "' -%}"
    "{%- elif 'text' in _c -%}"
    "{%- set _alm_text.s = _alm_text.s + _c['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _alm.messages = _alm.messages + [{'role': _m['role'], 'content': _alm_text.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _alm.messages %}"
)


def unsupported(run: TrainedRun) -> str | None:
    """Why `run` cannot be written as Qwen2-Audio (None: it can)."""
    model = run.cfg.model
    kinds = [e.kind for e in model.encoders]
    if model.connector.kind != "qwen2_audio":
        return f"the connector is {model.connector.kind!r}; {NEEDS}"
    if kinds != ["whisper"]:
        return f"the encoders are {kinds}; {NEEDS}"
    if run.model.llm.cfg.model_type != "qwen2":
        return f"the LLM is a {run.model.llm.cfg.model_type!r} model; {NEEDS}"
    enc = model.encoders[0]
    if enc.tap_indexing != "blocks":
        return ("the encoder is tapped with tap_indexing='hf' (its last entry is after Whisper's final LayerNorm); "
                "Qwen2-Audio pools the raw output of the last block: train with tap_indexing=blocks, taps=[-1]")
    if enc.pad_to_seconds != WINDOW_SECONDS:
        return (f"the Whisper encoder runs with pad_to_seconds={enc.pad_to_seconds}, but Qwen2-Audio's feature "
                f"extractor pads every clip to {WINDOW_SECONDS:g} s (3000 mel frames), so the exported model would "
                f"see other encoder inputs; train with model.encoders.0.pad_to_seconds={WINDOW_SECONDS:g}")
    positions = run.model.encoders[0].config.max_source_positions
    if positions != SOURCE_POSITIONS:
        return (f"the Whisper encoder has max_source_positions={positions}; Qwen2-Audio's encoder takes exactly "
                f"{2 * SOURCE_POSITIONS} mel frames ({SOURCE_POSITIONS} positions)")
    return None


def encoder_tensors(encoder) -> Iterator[tuple[str, np.ndarray]]:
    """(Qwen2-Audio key, torch-layout float32 array) for every parameter of our WhisperEncoder except its final
    LayerNorm, one at a time."""
    for path, array in host_tensors(encoder):
        for pattern, template, transform in ENCODER_TO_HF:
            m = re.fullmatch(pattern, path)
            if m is not None:
                break
        else:
            raise WeightImportError(f"the Whisper encoder parameter {path!r} has no Qwen2-Audio name; extend "
                                    "export.qwen2_audio.ENCODER_TO_HF")
        if template is not None:
            yield "audio_tower." + template.format(*m.groups()), transform(array.astype(np.float32, copy=False))


def connector_tensors(connector) -> Iterator[tuple[str, np.ndarray]]:
    """(Qwen2-Audio key, torch-layout float32 array) for the connector's LayerNorm and Linear."""
    seen = set()
    for path, array in host_tensors(connector):
        if path not in CONNECTOR_TO_HF:
            raise WeightImportError(f"the qwen2_audio connector parameter {path!r} has no Qwen2-Audio name")
        key, transform = CONNECTOR_TO_HF[path]
        seen.add(path)
        yield key, transform(array.astype(np.float32, copy=False))
    if seen != set(CONNECTOR_TO_HF):
        raise WeightImportError(f"the connector lacks {sorted(set(CONNECTOR_TO_HF) - seen)}; is it a qwen2_audio one?")


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`[n, d]` -> `[rows, d]`, new rows = the mean of the existing ones."""
    if rows == x.shape[0]:
        return x
    return np.concatenate([x, np.broadcast_to(x.mean(0, keepdims=True), (rows - x.shape[0], x.shape[1]))], 0)


def llm_tensors(llm, vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """(Qwen2-Audio key, torch-layout float32 array) for the LLM with LoRA merged, embedding and head padded to
    `vocab` rows; a tied LLM's head is written as its own tensor (Qwen2-Audio never ties it)."""
    for path, array in merged_tensors(llm):
        key, transform = hf_name(path, llm.cfg)
        array = transform(array)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            array = _pad_rows(array, vocab)
        yield "language_model." + key, array
        if key == "model.embed_tokens.weight" and llm.cfg.tie_word_embeddings:
            yield "language_model.lm_head.weight", array


def chat_template(llm_template: str) -> str:
    """The exported chat template: list contents flattened (audio -> <|AUDIO|>), then the LLM's template."""
    return _CONTENT_TO_TEXT + llm_template


def _tokenizer(llm_dir: str | Path):
    """The LLM's tokenizer with the Qwen2-Audio special tokens (added when missing) and the exported template."""
    from transformers import AddedToken, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llm_dir)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"the LLM tokenizer in {llm_dir} has no chat template; the Qwen2-Audio processor needs one")
    vocab = tok.get_vocab()
    missing = [t for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS) if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tok.chat_template = chat_template(tok.chat_template)
    return tok


def _configs(run: TrainedRun, vocab: int, audio_token_id: int, dtype: str):
    """The Qwen2AudioConfig of the export."""
    from transformers import Qwen2AudioConfig
    enc = run.model.encoders[0].config
    text = read_config(run.cfg.model.llm)
    text.update(vocab_size=vocab, tie_word_embeddings=False, dtype=dtype)
    text.pop("torch_dtype", None)
    text.pop("architectures", None)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=enc.num_mel_bins, d_model=enc.d_model,
                 encoder_layers=enc.encoder_layers, encoder_attention_heads=enc.encoder_attention_heads,
                 encoder_ffn_dim=enc.encoder_ffn_dim, max_source_positions=enc.max_source_positions,
                 activation_function=enc.activation_function, scale_embedding=False)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=audio_token_id)
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.dtype = dtype
    return config


def export(run: TrainedRun, out: str | Path, *, dtype: str = "float32",
           max_shard_bytes: int = 5 * 10 ** 9) -> list[str]:
    """Writes `run` as a Qwen2-Audio directory `out` (see the module docstring); returns the files written,
    relative to `out`."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
    why = unsupported(run)
    if why is not None:
        raise ConfigError(f"cannot export this run as 'qwen2-audio': {why}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, llm_dir = run.model, run.cfg.model.llm
    tok = _tokenizer(llm_dir)
    vocab = max(model.llm.cfg.vocab_size, len(tok))
    audio_token_id = tok.convert_tokens_to_ids(AUDIO_TOKEN)

    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes)
    np_dtype = DTYPES[dtype]
    parts = (encoder_tensors(model.encoders[0]), connector_tensors(model.connector), llm_tensors(model.llm, vocab))
    for tensors in parts:
        for key, array in tensors:
            writer.add(key, np.asarray(array).astype(np_dtype))
    files = writer.close()

    _configs(run, vocab, audio_token_id, dtype).save_pretrained(out)
    files.append("config.json")
    extractor = WhisperFeatureExtractor(feature_size=model.encoders[0].config.num_mel_bins, sampling_rate=16000,
                                        hop_length=160, chunk_length=int(WINDOW_SECONDS), n_fft=400,
                                        padding_value=0.0, return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tok, chat_template=tok.chat_template)
    with tempfile.TemporaryDirectory(dir=out) as tmp:   # the processor's files, listed as written
        processor.save_pretrained(tmp)
        extractor.save_pretrained(tmp)   # preprocessor_config.json too, as Qwen2-Audio repos (and transformers 4) have
        for p in sorted(Path(tmp).iterdir()):
            shutil.move(str(p), out / p.name)
            files.append(p.name)
    for name in GENERATION_FILES:
        if (Path(llm_dir) / name).is_file():
            shutil.copyfile(Path(llm_dir) / name, out / name)
            files.append(name)
    return sorted(set(files))
