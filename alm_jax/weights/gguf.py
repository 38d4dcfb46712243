"""Convert a llama.cpp GGUF file of a Llama-family model into a Hugging Face directory (float32).

The hyperparameters come from the GGUF metadata; every tensor is dequantized with the `gguf` package, one
at a time, and streamed into `model.safetensors`. llama.cpp's converter reorders the rows of the query and
key projections (per head, the two rotary halves are interleaved); that is undone here so that the
weights work with Hugging Face's `rotate_half` rotary convention.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alm_jax.errors import WeightImportError
from alm_jax.weights.safetensors_stream import write_safetensors

# GGUF tensor name (inside `blk.N.`) -> Hugging Face name (inside `model.layers.N.`).
_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_REQUIRED = object()
_ROWS_PER_CHUNK = 4096


def _meta(reader, key: str, default=_REQUIRED):
    """One metadata value of the GGUF file (scalars as Python values, arrays as lists)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise WeightImportError(f"GGUF metadata key {key!r} is missing; cannot build the model config")
        return default
    return field.contents()


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def _f32(x: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(str(np.float32(x)))


def read_llama_hparams(reader) -> dict:
    """Llama hyperparameters from the GGUF metadata, as `LlamaConfig` keyword arguments."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise WeightImportError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise WeightImportError(f"GGUF rope scaling {scaling!r} is not supported by this converter")
    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    heads = int(_meta(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_meta(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim or int(_meta(reader, f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise WeightImportError(
            f"GGUF rope.dimension_count={rope_dim} / value_length differ from head_dim={head_dim}; "
            "partial rotary or uneven heads are not supported"
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_meta(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else _REQUIRED))
    names = {t.name for t in reader.tensors}
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_meta(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length")),
        rms_norm_eps=_f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": _f32(_meta(reader, f"{arch}.rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_int_or_none(_meta(reader, "tokenizer.ggml.bos_token_id", None)),
        eos_token_id=_int_or_none(_meta(reader, "tokenizer.ggml.eos_token_id", None)),
        pad_token_id=_int_or_none(_meta(reader, "tokenizer.ggml.padding_token_id", None)),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def expected_shapes(hp: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter name -> shape for a LlamaForCausalLM with these hyperparameters."""
    d, f, v = hp["hidden_size"], hp["intermediate_size"], hp["vocab_size"]
    q, kv = hp["num_attention_heads"] * hp["head_dim"], hp["num_key_value_heads"] * hp["head_dim"]
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not hp["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(hp["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; unknown names raise WeightImportError."""
    if gguf_name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_KEYS:
        return f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"
    raise WeightImportError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. `w`: [n_heads * head_dim, in].

    Per head, llama.cpp stores rows as rotary pairs (0, d/2), (1, d/2 + 1), ... interleaved; Hugging Face
    keeps the first half of the head's rows, then the second half.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _dequantized(reader, hp: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, float32 array [out, in]) per GGUF tensor, in file order."""
    from gguf import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(x) for x in reversed(t.shape))
        w = np.empty(shape, np.float32)
        rows = w.reshape(-1, shape[-1])  # a view: chunks of rows bound the dequantizer's temporaries
        data = t.data.reshape(rows.shape[0], -1)
        try:
            for i in range(0, rows.shape[0], _ROWS_PER_CHUNK):
                chunk = dequantize(data[i : i + _ROWS_PER_CHUNK], t.tensor_type)
                rows[i : i + _ROWS_PER_CHUNK] = chunk.reshape(-1, shape[-1])
        except NotImplementedError as e:
            raise WeightImportError(f"GGUF tensor {t.name!r}: cannot dequantize {t.tensor_type.name}: {e}") from e
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rotary_rows(w, hp["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rotary_rows(w, hp["num_key_value_heads"])
        yield name, w


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write config, generation config, float32 `model.safetensors` and tokenizer files into `out_dir`."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise WeightImportError(f"GGUF file {gguf_path} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)  # memory-mapped; tensors are read lazily
    hp = read_llama_hparams(reader)

    expected = expected_shapes(hp)
    layout, seen = [], set()
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(x) for x in reversed(t.shape))
        if name in seen:
            raise WeightImportError(f"GGUF tensor {t.name!r} appears twice")
        if name not in expected:
            raise WeightImportError(f"GGUF tensor {t.name!r} ({name}) is unexpected for this config")
        if shape != expected[name]:
            raise WeightImportError(f"GGUF tensor {t.name!r} ({name}) has shape {shape}, expected {expected[name]}")
        seen.add(name)
        layout.append((name, shape, np.float32))
    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightImportError(f"GGUF file lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    config = LlamaConfig(**hp, architectures=["LlamaForCausalLM"], dtype="float32")
    config.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=hp["bos_token_id"], eos_token_id=hp["eos_token_id"], pad_token_id=hp["pad_token_id"]
    ).save_pretrained(out_dir)
    write_safetensors(out_dir / "model.safetensors", layout, _dequantized(reader, hp))
    del reader
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise WeightImportError(f"{gguf_path}: the GGUF tokenizer has no chat template")
    tokenizer.save_pretrained(out_dir)
    return out_dir
