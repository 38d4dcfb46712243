"""Typed configs: nested frozen dataclasses, loaded from YAML plus dotted CLI overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "mesh.fsdp=4"])

Every key is checked against the dataclass fields: an unknown key, a wrong type or a value outside the
allowed set raises `ConfigError` naming the full key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from alm_jax.errors import ConfigError

# ---------------------------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """One frozen audio encoder. `path`: HF dir, or `demo:whisper-tiny.en` for the bundled demo model.
    `kind`: "whisper" (log-mel input), "w2v_bert" (W2V-BERT 2.0, fbank input computed from the waveforms
    on device; `pad_to_seconds` does not change its valid outputs, which its attention mask isolates) or "clap"
    (CLAP's audio tower: one projected clip embedding per clip, features computed on device from the
    waveforms resampled to 48 kHz; a clip over the extractor's window, 10 s, is cut to its first window)."""
    path: str = "demo:whisper-tiny.en"
    kind: Literal["whisper", "w2v_bert", "clap"] = "whisper"
    taps: tuple[int, ...] = (-1,)
    tap_indexing: Literal["blocks", "hf"] = "blocks"   # blocks: raw block outputs (DeSTA); hf: hidden_states (ALARM)
    pad_to_seconds: float | None = 30.0                # 30 s pad (DeSTA) or None = trim (ALARM)


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """The trainable bridge from encoder states to LLM embeddings."""
    kind: str = "desta"      # a registered kind: alm_jax/models/connectors/__init__.py::CONNECTORS
    num_queries: int = 64
    num_layers: int = 2
    num_heads: int = 8
    hidden: int = 0          # 0: the encoder width
    intermediate: int = 0    # 0: 4 * hidden
    adapter_dim: int = 1024
    norm: Literal["layer", "batch"] = "layer"
    perceiver_latents: int = 20
    mapper_tokens: int = 40


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0            # 0 = off
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r".*(q_proj|v_proj).*"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    llm: str = "demo:smollm2-135m-instruct"
    encoders: tuple[EncoderConfig, ...] = (EncoderConfig(),)
    connector: ConnectorConfig = ConnectorConfig()
    lora: LoRAConfig = LoRAConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    fraction: float = 1.0         # nested data-size subset for scaling studies
    seed: int = 0
    batch_size: int = 8           # global batch
    max_text_tokens: int = 256    # static text length T of a row
    max_clips: int = 1            # audio slots per sample
    max_audio_seconds: float = 30.0   # buffer length when encoders trim (pad_to_seconds = null)
    num_workers: int = 0
    host_features: bool = False   # compute the log-mel in the input pipeline (numpy) instead of on device
    bad_fraction_limit: float = 0.01
    epochs: int = 0               # 0 = repeat forever (steps decide)
    shards: int = 0               # data shards S of the global batch (0 = one per process); fix S to keep
                                  # batches identical across cluster sizes (see data/multihost.py)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.01
    warmup_steps: int = 100
    total_steps: int = 1000
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1             # data-parallel replicas across slices/hosts groups


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every: int = 500
    keep_last: int = 3
    keep_every: int = 0           # 0 = none kept beyond the last N
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Settings of one evaluation suite (an `eval.suites` entry, found by `name`; see alm_jax/evaluation)."""
    name: str = ""                # the suite (an EVALUATORS name): mmau | mmsu | mmar | hallucination | forgetting | multi_audio
    data: str = ""                # mmau/mmsu/mmar: the benchmark's items file; forgetting: a prompts JSONL (optional)
    audio_root: str = ""          # where item audio paths resolve (default: the items file's directory)
    prompt: Literal["desta", "plain", "official"] = "desta"   # official = MMSU's letter prompt
    rule: Literal["auto", "official", "string_match"] = "auto"   # auto: official, MMSU's letter rule only with its prompt
    limit: int = 0                # the first N items / clips / prompts (0 = all)
    batch_size: int = 8           # rows per generate call
    max_new_tokens: int = 64
    clips: int = 40               # hallucination / multi_audio: held-out demo clips (or pairs)
    seed: int = 1                 # hallucination / multi_audio: the held-out demo source's seed (train on others)
    kl: bool = True               # forgetting: also the mean token KL (keeps the backbone in memory)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0                # 0 = off
    batches: int = 4
    corpus: tuple[str, ...] = ()  # held-out corpus directories (required when every > 0 and "loss" runs)
    evaluators: tuple[str, ...] = ("loss",)   # names in alm_jax/evaluation/__init__.py::EVALUATORS
    suites: tuple[SuiteConfig, ...] = ()      # per-suite settings for the evaluators named above


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    dir: str = "runs/default"
    every: int = 10
    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    seed: int = 0
    steps: int = 1000
    sync_every_step: Literal["auto", "on", "off"] = "auto"   # auto: on for multi-device CPU (see ENVIRONMENT.md)
    resume: str = "auto"          # auto | none | a step number | a checkpoint path
    max_bad_steps: int = 5        # consecutive non-finite steps before stopping


# ---------------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} is not one of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def from_dict(cls, data: dict, path: str = ""):
    """Builds dataclass `cls` from a (nested) dict, strictly."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown config key {(path + '.' if path else '') + key!r}; "
                          f"allowed here: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        return x
    return conv(cfg)


def apply_override(data: dict, override: str) -> dict:
    """Applies one `a.b.c=value` override (value parsed as YAML) to a nested dict, in place.
    A list index may appear as a number: `model.encoders.0.taps=[3,5]`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from e
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is not a valid list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key!r}: {last!r} is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=TrainConfig):
    """Loads YAML (or defaults when `path` is None), applies dotted overrides, validates into `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    data = _merge(to_dict(cls()), data)
    for o in overrides:
        apply_override(data, o)
    return from_dict(cls, data)


def _merge(base: dict, over: dict) -> dict:
    """Recursive merge of `over` onto `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
