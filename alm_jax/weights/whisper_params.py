"""Strict key tables: HF Whisper tensors -> `alm_jax.models.whisper.WhisperEncoder` (`ENCODER_RULES`) and
`alm_jax.models.whisper_decoder.WhisperDecoder` (`DECODER_RULES`) state, and the generation settings of
greedy transcription (`generation_config.json`).

Accepts both checkpoint layouts: `encoder.*`/`decoder.*` (WhisperModel) and `model.encoder.*`/`model.decoder.*`
(WhisperForConditionalGeneration). Each half skips the other half's tensors (`ENCODER_IGNORE`,
`DECODER_IGNORE`); anything else unmapped is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from alm_jax.errors import WeightImportError
from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.models.whisper_decoder import WhisperDecoder, WhisperDecoderConfig, WhisperGenerationConfig
from alm_jax.weights.hf_import import Rule, identity, import_weights, read_config, transpose

_P = r"(?:model\.)?encoder\."  # the one encoder prefix, with or without the `model.` wrapper
_L = _P + r"layers\.(\d+)\."


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv1d weight `[out, in, width]` -> our kernel `[width, in, out]`."""
    return np.transpose(x, (2, 1, 0))


ENCODER_RULES: tuple[Rule, ...] = (
    Rule(_P + r"conv1\.weight", "conv1.kernel", conv_kernel),
    Rule(_P + r"conv1\.bias", "conv1.bias"),
    Rule(_P + r"conv2\.weight", "conv2.kernel", conv_kernel),
    Rule(_P + r"conv2\.bias", "conv2.bias"),
    Rule(_P + r"embed_positions\.weight", "embed_positions", identity),
    Rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", "layers.{0}.attn.{1}.kernel", transpose),
    Rule(_L + r"self_attn\.(q_proj|v_proj|out_proj)\.bias", "layers.{0}.attn.{1}.bias"),
    Rule(_L + r"self_attn_layer_norm\.weight", "layers.{0}.attn_norm.scale"),
    Rule(_L + r"self_attn_layer_norm\.bias", "layers.{0}.attn_norm.bias"),
    Rule(_L + r"(fc1|fc2)\.weight", "layers.{0}.{1}.kernel", transpose),
    Rule(_L + r"(fc1|fc2)\.bias", "layers.{0}.{1}.bias"),
    Rule(_L + r"final_layer_norm\.weight", "layers.{0}.mlp_norm.scale"),
    Rule(_L + r"final_layer_norm\.bias", "layers.{0}.mlp_norm.bias"),
    Rule(_P + r"layer_norm\.weight", "layer_norm.scale"),
    Rule(_P + r"layer_norm\.bias", "layer_norm.bias"),
)

# Known tensors of full Whisper checkpoints that an encoder-only load skips.
ENCODER_IGNORE: tuple[str, ...] = (
    r"(?:model\.)?decoder\..*",
    r"proj_out\.weight",
)


def load_whisper_encoder(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None,
                         scan_layers: bool = True) -> WhisperEncoder:
    """The encoder of a local HF Whisper directory (WhisperModel or WhisperForConditionalGeneration,
    safetensors), parameters stored in `dtype` (frozen), placed on `mesh` by their logical axes if given;
    blocks scanned (stacked `[L, ...]`) or unrolled (`scan_layers`).
    Decoder weights are skipped; any other unexpected, missing or mis-shaped key raises WeightImportError."""
    cfg = WhisperEncoderConfig.from_hf(read_config(path))
    return import_weights(lambda: WhisperEncoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                                 scan_layers=scan_layers),
                          path, ENCODER_RULES, dtype=dtype, mesh=mesh, ignore=ENCODER_IGNORE,
                          family="whisper encoder")


_D = r"(?:model\.)?decoder\."  # the decoder prefix, with or without the `model.` wrapper
_DL = _D + r"layers\.(\d+)\."

DECODER_RULES: tuple[Rule, ...] = (
    Rule(_D + r"embed_tokens\.weight", "embed_tokens.embedding"),
    Rule(_D + r"embed_positions\.weight", "embed_positions"),
    Rule(_DL + r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)\.weight", "layers.{0}.{1}.{2}.kernel",
         transpose),
    Rule(_DL + r"(self_attn|encoder_attn)\.(q_proj|v_proj|out_proj)\.bias", "layers.{0}.{1}.{2}.bias"),
    Rule(_DL + r"(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)\.weight", "layers.{0}.{1}.scale"),
    Rule(_DL + r"(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)\.bias", "layers.{0}.{1}.bias"),
    Rule(_DL + r"(fc1|fc2)\.weight", "layers.{0}.{1}.kernel", transpose),
    Rule(_DL + r"(fc1|fc2)\.bias", "layers.{0}.{1}.bias"),
    Rule(_D + r"layer_norm\.weight", "layer_norm.scale"),
    Rule(_D + r"layer_norm\.bias", "layer_norm.bias"),
)
PROJ_OUT_RULE = Rule(r"proj_out\.weight", "proj_out.kernel", transpose)   # only for untied heads

# Known tensors of full Whisper checkpoints that a decoder-only load skips.
DECODER_IGNORE: tuple[str, ...] = (r"(?:model\.)?encoder\..*",)


def load_whisper_decoder(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> WhisperDecoder:
    """The decoder (+ LM head) of a local HF Whisper directory, parameters in `dtype` (frozen), placed on
    `mesh` by their logical axes if given. Encoder weights are skipped; a tied head's duplicate
    `proj_out.weight` too. Any other unexpected, missing or mis-shaped key raises WeightImportError."""
    cfg = WhisperDecoderConfig.from_hf(read_config(path))
    rules = DECODER_RULES + (() if cfg.tie_word_embeddings else (PROJ_OUT_RULE,))
    ignore = DECODER_IGNORE + ((r"proj_out\.weight",) if cfg.tie_word_embeddings else ())
    return import_weights(lambda: WhisperDecoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
                          path, rules, dtype=dtype, mesh=mesh, ignore=ignore, family="whisper decoder")


def load_whisper(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None,
                 scan_layers: bool = True) -> tuple[WhisperEncoder, WhisperDecoder]:
    """(encoder, decoder) of a full local HF Whisper directory (both halves strict; see the two loaders; the
    decoder's layers stay unrolled)."""
    return (load_whisper_encoder(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers),
            load_whisper_decoder(path, dtype=dtype, mesh=mesh))


def load_generation_config(path: str | Path, *, language: str | None = None) -> WhisperGenerationConfig:
    """Greedy-transcription settings from `generation_config.json` (falling back to `config.json`), built like
    transformers' `_retrieve_init_tokens` with timestamps off: `<|startoftranscript|>`, then for a multilingual
    model `<|language|>` + `<|transcribe|>` (`language` required: no language detection here), else the
    `forced_decoder_ids` if any, then `<|notimestamps|>`; plus the suppress lists and EOS/pad ids."""
    path = Path(path)
    gen_file = path / "generation_config.json"
    config = read_config(path)
    if gen_file.exists():
        try:
            gen = json.loads(gen_file.read_text())
        except json.JSONDecodeError as e:
            raise WeightImportError(f"{gen_file}: invalid JSON ({e})") from e
    else:
        gen = {}
    get = lambda k, default=None: gen.get(k, config.get(k, default))  # noqa: E731
    start = get("decoder_start_token_id")
    eos = get("eos_token_id")
    if start is None or eos is None:
        raise WeightImportError(f"{path}: generation_config.json/config.json lack decoder_start_token_id or "
                                "eos_token_id; pass a Hugging Face Whisper directory with its generation config")
    prompt = [int(start)]
    if gen.get("is_multilingual") or "lang_to_id" in gen:
        if language is None:
            raise WeightImportError(f"{path} is a multilingual Whisper; pass language= (e.g. 'en'): language "
                                    "detection is not implemented")
        token = language if language.startswith("<|") else f"<|{language}|>"
        if token not in gen.get("lang_to_id", {}):
            raise WeightImportError(f"language {language!r} is not in {gen_file}'s lang_to_id; use a code such as 'en'")
        prompt += [int(gen["lang_to_id"][token]), int(gen["task_to_id"]["transcribe"])]
    else:
        forced = get("forced_decoder_ids") or []
        for i, (index, token) in enumerate(forced, start=1):
            if index != i:
                raise WeightImportError(f"{path}: forced_decoder_ids {forced} do not follow Whisper's prompt pattern")
            if token is not None:
                prompt.append(int(token))
    no_ts = get("no_timestamps_token_id")
    if no_ts is not None and prompt[-1] != int(no_ts):
        prompt.append(int(no_ts))
    eos_id = int(eos[0] if isinstance(eos, list) else eos)
    pad = get("pad_token_id", eos_id)
    return WhisperGenerationConfig(
        prompt=tuple(prompt), eos_token_id=eos_id, pad_token_id=int(eos_id if pad is None else pad),
        suppress_tokens=tuple(int(t) for t in (get("suppress_tokens") or ())),
        begin_suppress_tokens=tuple(int(t) for t in (get("begin_suppress_tokens") or ())))
