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
    window_seconds: float | None = None   # Whisper as ALARM feeds it: the clip cut into windows of this length,
                                          # each padded to it and encoded alone, states concatenated (ALARM: 30;
                                          # clips up to data.max_audio_seconds, 60 s = 2 windows); needs
                                          # pad_to_seconds null. None = one pass over the padded / trimmed clip
    input_convention: Literal["native", "alarm"] = "native"   # how a clip becomes this encoder's input and how
                                          # many of its frames are valid (alm_jax.audio.features.encoder_frames).
                                          # native: the encoder's own extractor. alarm: ALARM's extractors
                                          # (feature_extractor_implementations/): Whisper counts the HF
                                          # attention mask, ceil(n / 160) // 2 frames; W2V-BERT zero-pads the
                                          # clip by 160 samples on each side first. Kinds whisper, w2v_bert


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """The trainable bridge from encoder states to LLM embeddings."""
    kind: str = "desta"      # a registered kind: alm_jax/models/connectors/__init__.py::CONNECTORS
    num_queries: int = 64
    num_layers: int = 2
    num_heads: int = 0       # attention heads; 0: the kind's default (desta: encoder 0's attention heads, as
                             # DeSTA2.5's Q-Former, e.g. 20 for whisper-large-v3; mats: 8). Explicit values win
    hidden: int = 0          # 0: the encoder width
    intermediate: int = 0    # FFN width; 0: the kind's default (desta: 3072, DeSTA2.5's BertConfig
                             # intermediate_size, whatever `hidden`; alarm_ca fusion: 4 * hidden)
    adapter_dim: int = 1024
    norm: Literal["layer", "batch"] = "layer"   # alarm: the conv adapters' norm; desta: the norm before the LLM
                             # projection, layer = DeSTA2.5's LayerNorm, batch = BatchNorm per query and channel
                             # over a batch's clips (ours: the tokens' shared part only in learned biases)
    perceiver_latents: int = 20
    # ALARM (Blinorot/ALARM alarm_ca.yaml / alarm_p.yaml; published values are the defaults)
    adapters: tuple[Literal["batch", "layer", "mlp", "identity"], ...] = ()   # per encoder (model.encoders order)
                             # its adapter: batch / layer = conv downsampler (T // 2) with BatchNorm / LayerNorm
                             # (Whisper: batch; W2V-BERT, SSLAM: layer), mlp = 2-layer MLP (MuQ; T), identity =
                             # layer average only (ALARM-P's conditional inputs). () = `norm` conv adapters
                             # (alarm_p: identity for encoders 1..)
    fusion_heads: int = 16   # ALARM-CA fusion attention heads (alarm_ca reads these, not num_heads / num_layers)
    fusion_layers: tuple[int, ...] = ()   # ALARM-CA decoder layers per conditional encoder (1..); () = 1 each
    perceiver_dim: int = 768           # ALARM-P Perceiver latent channels
    perceiver_heads: int = 4           # ... self-attention heads
    perceiver_cross_heads: int = 4     # ... cross-attention heads
    perceiver_blocks: int = 3          # ... self-attention blocks
    perceiver_block_layers: int = 6    # ... layers per self-attention block
    perceiver_cross_layers: int = 1    # ... cross-attention layers (before blocks 1..; <= perceiver_blocks)
    perceiver_shared: bool = True      # blocks 2.. (and cross layers 2..) reuse the first one's weights
    perceiver_widening: int = 1        # ... MLP widening factor
    mapper_tokens: int = 40
    dropout: float = 0.0     # connector dropout in training (DeSTA's Q-Former: BERT's 0.1; ALARM-CA fusion: 0.1)
    output_init: Literal["default", "embeddings"] = "default"   # embeddings: the last projection starts with the
                             # LLM's token-embedding RMS (its kernel rescaled), so fresh audio tokens look like
                             # text to the frozen LLM; a small-data departure from the papers' init (the demo)
    transcript_tokens: int = 0   # DeSTA2.5: after each clip's audio tokens, at most this many tokens of its
                                 # transcript (training: the record's; inference: Whisper's, behind the voice-
                                 # activity gate; " " without speech). 0 = off; published 100
    noise_variance: float = 0.015   # MATS: variance of the Gaussian noise on the normalized CLAP text embedding
                                    # in text-only training (published 0.015; 0 = off; eval mode: none)
    caption_tokens: int = 77        # MATS: CLAP text tokens per caption (padded / cut, LAION-CLAP's 77)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0            # 0 = off
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r".*(q_proj|v_proj).*"


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
    """Staged training: learned weights of an earlier run copied into this model before its first step (a
    fresh start only; a resumed run reads everything from its own checkpoint). `run`: the earlier run's
    checkpoint directory; `step`: its step (0 = the latest); `map`: {path there: path here} (dotted module or
    parameter paths, e.g. `connector.adapters.0: connector.adapters.1`): every parameter and BatchNorm
    statistic under the path there goes under the path here (same names and shapes, else a ConfigError)."""
    run: str = ""
    step: int = 0
    map: tuple[tuple[str, str], ...] = ()   # YAML: a mapping {from: to} (kept in order)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    llm: str = "demo:smollm2-135m-instruct"
    encoders: tuple[EncoderConfig, ...] = (EncoderConfig(),)
    connector: ConnectorConfig = ConnectorConfig()
    lora: LoRAConfig = LoRAConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True      # layer stacks (LLM, Whisper encoder, Q-Former) as one scanned, stacked block;
                                  # false = unrolled Python loop (debugging; same numbers)
    remat: Literal["none", "full", "save_dots"] = "none"   # rematerialization of each scanned block in training
                                                            # (MaxText's names: full = recompute all, save_dots =
                                                            # keep matmul outputs)
    freeze: tuple[str, ...] = ()  # learned modules/parameters held fixed (staged training, ALARM-CA/P): dotted
                                  # path patterns (fnmatch globs: `connector.adapters.0`, `connector.adapters.*`);
                                  # no gradient, no optimizer state; saved with the rest in the checkpoint
    frozen_mode: Literal["eval", "train"] = "eval"   # how the modules `freeze` names run in training: eval =
                                  # BatchNorm on its running statistics (not updated), dropout off; train = as
                                  # ALARM's public code (gradients off only: batch statistics, running ones updated)
    init_from: tuple[InitFromConfig, ...] = ()   # weights of earlier runs to start from (see InitFromConfig)


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
    cycles: int = 1          # cosine cycles over total_steps (SGDR warm restarts): each restarts at once (no warmup)
    cycle_decay: float = 0.5  # cycle k peaks at lr * cycle_decay**k
    lr_mults: tuple[tuple[str, float], ...] = ()   # YAML: {regex: multiplier} over trainable parameter paths
                             # ("connector.net.proj.kernel"); the first full match scales that parameter's update
                             # (its learning rate and decoupled weight decay), others keep 1 (big_vision lr_mults)


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
    name: str = ""                # the suite (an EVALUATORS name): mmau | mmsu | mmar | hallucination | forgetting | multi_audio | alignment
    data: str = ""                # mmau/mmsu/mmar: the benchmark's items file; forgetting: a prompts JSONL (optional)
    audio_root: str = ""          # where item audio paths resolve (default: the items file's directory)
    prompt: Literal["desta", "plain", "official"] = "desta"   # official = MMSU's letter prompt
    rule: Literal["auto", "official", "string_match"] = "auto"   # auto: official, MMSU's letter rule only with its prompt
    limit: int = 0                # the first N items / clips / prompts (0 = all)
    batch_size: int = 8           # rows per generate call
    max_new_tokens: int = 64
    clips: int = 40               # hallucination / multi_audio / alignment: held-out demo clips (or pairs)
    seed: int = 1                 # hallucination / multi_audio / alignment: the held-out demo source's seed (train on others)
    kl: bool = True               # forgetting: also the mean token KL (keeps the backbone in memory)
    baselines: bool = True        # hallucination: also the backbone's accuracy from the seed descriptions
                                  # and the ALM's without audio (alignment and multi_audio always have them)


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """How evaluation answers are decoded (`eval.decoding`; evaluation/answering.py `Answerer`, models/beam.py).
    greedy = argmax; beam = transformers' beam search (MATS: num_beams 4, no_repeat_ngram_size 2,
    repetition_penalty 2.0). The penalties count the answer's tokens only (the prompt goes in as embeddings)."""
    kind: Literal["greedy", "beam"] = "greedy"
    num_beams: int = 4
    no_repeat_ngram_size: int = 0        # beam: an n-gram may occur once in the answer (0 = off)
    repetition_penalty: float = 1.0      # beam: HF's, on the log-probabilities of tokens already in the answer
    length_penalty: float = 1.0          # beam: hypothesis score = sum of log-probs / length ** this
    early_stopping: bool | Literal["never"] = False   # beam: HF's (false = its heuristic, true = k finished)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0                # 0 = off
    batches: int = 4
    corpus: tuple[str, ...] = ()  # held-out corpus directories (required when every > 0 and "loss" runs)
    listening_gap: bool = False   # "loss" also scores each sample with the next sample's audio: eval/listening_gap
    evaluators: tuple[str, ...] = ("loss",)   # names in alm_jax/evaluation/__init__.py::EVALUATORS
    suites: tuple[SuiteConfig, ...] = ()      # per-suite settings for the evaluators named above
    santa: str = "auto"           # MATS answers: the Santa memory file (`alm santa` writes it); auto =
                                  # <checkpoint.dir>/santa.safetensors when it exists, off = plain audio path
    decoding: DecodingConfig = DecodingConfig()   # how answers are decoded (every answering suite)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    dir: str = "runs/default"
    every: int = 10
    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    """The divergence guard (training/divergence.py). A step whose loss or gradient norm is more than
    `max_*_ratio` x the median of the last `window` healthy steps, or whose update leaves the trainable
    parameters' norm more than `max_param_ratio` x their recent median, stops the run (0 turns a check off).
    Checkpoints saved from the states that produced it are moved to `checkpoint.dir/diverged/`, so
    `resume=auto` (and `alm eval` / `alm export`) only see good ones."""
    window: int = 20              # healthy steps the running median covers
    min_history: int = 5          # loss/grad checks start once this many healthy steps are seen (per process run)
    max_loss_ratio: float = 10.0
    max_grad_ratio: float = 0.0   # off: gradient norms legitimately swing by orders of magnitude
    max_param_ratio: float = 10.0


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
    resume: str | int = "auto"    # auto | none | a step number (resume=9) | a checkpoint path
    resume_discard_later: bool = False   # resuming before the newest step deletes the later ones (else refused)
    resume_allow_changes: tuple[str, ...] = ()   # config keys/sections that may differ from the checkpoint's
    max_bad_steps: int = 5        # consecutive non-finite steps before stopping
    divergence: DivergenceConfig = DivergenceConfig()


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
        if isinstance(value, dict) and args and typing.get_origin(args[0]) is tuple:   # {a: b} -> ((a, b),)
            value = [list(kv) for kv in value.items()]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) > 1 and args[1] is not Ellipsis:   # a fixed-length tuple: one type per position
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
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


# ---------------------------------------------------------------------------------------------- checks


def _check(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def validate_train_config(cfg: TrainConfig) -> None:
    """Value checks the types cannot express (counts >= 1, ratios >= 0, ...): a ConfigError naming the key
    and what it must be, before anything is built."""
    import math
    _check(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1 (the optimizer step to train to)")
    d, o = cfg.data, cfg.optim
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1 (the global batch)")
    _check(d.epochs >= 0, "data.epochs", d.epochs, "must be >= 0 (0 = repeat the corpus forever)")
    _check(d.max_text_tokens >= 1, "data.max_text_tokens", d.max_text_tokens, "must be >= 1")
    _check(d.max_clips >= 1, "data.max_clips", d.max_clips, "must be >= 1")
    _check(cfg.model.connector.transcript_tokens >= 0, "model.connector.transcript_tokens",
           cfg.model.connector.transcript_tokens, "must be >= 0 (0 = no transcript tokens; DeSTA2.5: 100)")
    _check(cfg.model.connector.noise_variance >= 0, "model.connector.noise_variance",
           cfg.model.connector.noise_variance, "must be >= 0 (0 = no noise; MATS: 0.015)")
    _check(cfg.model.connector.caption_tokens >= 1, "model.connector.caption_tokens",
           cfg.model.connector.caption_tokens, "must be >= 1 (MATS with LAION-CLAP: 77)")
    _check(0 < d.fraction <= 1, "data.fraction", d.fraction, "must be in (0, 1]")
    _check(d.shards >= 0, "data.shards", d.shards, "must be >= 0 (0 = one per process)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(math.isfinite(o.lr) and o.lr >= 0, "optim.lr", o.lr, "must be a finite number >= 0")
    _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "must be >= 1")
    _check(d.batch_size % o.grad_accum == 0, "optim.grad_accum", o.grad_accum,
           f"must divide data.batch_size={d.batch_size} (each microbatch is batch_size / grad_accum rows)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.total_steps >= 1, "optim.total_steps", o.total_steps, "must be >= 1 (the schedule's length)")
    _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 = no clipping)")
    for k in ("every", "keep_last", "keep_every"):
        v = getattr(cfg.checkpoint, k)
        _check(v >= 0, f"checkpoint.{k}", v, "must be >= 0")
    _check(cfg.logging.every >= 0, "logging.every", cfg.logging.every, "must be >= 0 (0 = no metrics rows)")
    _check(cfg.eval.every >= 0, "eval.every", cfg.eval.every, "must be >= 0 (0 = no evals)")
    _check(cfg.max_bad_steps >= 1, "max_bad_steps", cfg.max_bad_steps, "must be >= 1")
    g = cfg.divergence
    _check(g.window >= 1, "divergence.window", g.window, "must be >= 1")
    _check(1 <= g.min_history <= g.window, "divergence.min_history", g.min_history,
           f"must be between 1 and divergence.window={g.window}")
    for k in ("max_loss_ratio", "max_grad_ratio", "max_param_ratio"):
        v = getattr(g, k)
        _check(v == 0 or v > 1, f"divergence.{k}", v, "must be 0 (off) or > 1 (a multiple of the running median)")
    if isinstance(cfg.resume, int):
        _check(cfg.resume >= 1, "resume", cfg.resume, "a step number must be >= 1 (or use auto / none / a path)")


# ---------------------------------------------------------------------------------------------- resume

# Keys a resumed run may change freely: where and how often it logs, checkpoints and evaluates, how long it
# runs, its mesh (restore onto any mesh), and the resume settings and guards themselves. Every other key
# (model.*, data.*, optim.*, seed, and any key added later) changes the data order or the math: a change is
# refused unless `resume_allow_changes` names it.
RESUME_FREE_KEYS = ("logging", "checkpoint", "eval", "mesh", "steps", "resume", "resume_discard_later",
                    "resume_allow_changes", "sync_every_step", "max_bad_steps", "divergence")


# Model keys whose absence from a stored config (written before the key existed) means another value than
# today's default: runs and bundles from before layer scanning hold unrolled (per-layer) parameters.
LEGACY_MODEL_VALUES: dict[str, Any] = {"scan_layers": False}


def with_legacy_model_values(model: dict) -> dict:
    """A stored `model` config dict with `LEGACY_MODEL_VALUES` filled in where it lacks them (a copy), so it
    rebuilds the parameter layout it was saved with."""
    return {**LEGACY_MODEL_VALUES, **model}


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "l": [{"x": 2}]}` -> `{"a.b": 1, "l.0.x": 2}` (lists of scalars stay leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[key + ".len"] = len(v)
            for i, x in enumerate(v):
                out.update(flatten_config(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _under(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def resume_config_changes(stored: dict, current: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """`{key: (checkpoint's value, current value)}` for every compared key (not under RESUME_FREE_KEYS) that
    differs. A key the stored config lacks (written before the key existed) counts as its default, or as its
    `LEGACY_MODEL_VALUES` entry."""
    if isinstance(stored.get("model"), dict):
        stored = {**stored, "model": with_legacy_model_values(stored["model"])}
    old, new = flatten_config(stored), flatten_config(current)
    base = flatten_config(defaults if defaults is not None else to_dict(TrainConfig()))
    changes = {}
    for key in sorted(set(old) | set(new)):
        if any(_under(key, s) for s in RESUME_FREE_KEYS):
            continue
        if key not in new:
            continue   # a key that no longer exists
        was = old[key] if key in old else base.get(key)
        if not _same(was, new[key]):
            changes[key] = (was, new[key])
    return changes


def check_resume_changes(changes: dict[str, tuple[Any, Any]], allowed: tuple[str, ...], current: dict,
                         where: str) -> dict[str, tuple[Any, Any]]:
    """The changes `allowed` (keys or sections) accepts; a ConfigError naming the rest (and any allowed
    entry that is not a compared key) otherwise. `where`: the checkpoint, for the message."""
    keys = flatten_config(current)
    for a in allowed:
        if not any(_under(k, a) for k in keys) or any(_under(a, s) or _under(s, a) for s in RESUME_FREE_KEYS):
            raise ConfigError(f"resume_allow_changes: {a!r} is not a key that resuming compares; name keys or "
                              "sections of model.*, data.*, optim.* or seed (e.g. optim.lr, data)")
    refused = {k: v for k, v in changes.items() if not any(_under(k, a) for a in allowed)}
    if refused:
        def short(x):
            s = repr(x)
            return s if len(s) <= 60 else s[:57] + "..."
        listed = "; ".join(f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in refused.items())
        raise ConfigError(f"resuming from {where} with a changed config ({listed}); these change the data order "
                          "or the math, so the run would not continue the one checkpointed. Restore the values, "
                          "start a new run (another checkpoint.dir, or resume=none there), or accept the change "
                          f"with resume_allow_changes=[{','.join(refused)}]")
    return changes
