"""The configs of the published models (configs/*.yaml): their hyper-parameters are the digest's published values
(`/work/shared/reference/methods-digest.md`, cited per row), their headers cite the method's section, and each one's
tiny-shaped twin (`tiny_twin`: every method knob kept, every size shrunk, tiny models and corpus) trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alm_jax.config import load_config, to_dict, validate_train_config

CONFIGS = Path(__file__).parent.parent / "configs"
PUBLISHED = ("desta25_llama31_8b", "balsa_llama31_8b", "alarm_whisper_qwen3_4b", "alarm_ca_qwen3_4b",
             "alarm_p_qwen3_4b", "mats_llama", "mallm")
DIGEST = {"desta25_llama31_8b": "§1", "balsa_llama31_8b": "§2", "alarm_whisper_qwen3_4b": "§3",
          "alarm_ca_qwen3_4b": "§3", "alarm_p_qwen3_4b": "§3", "mats_llama": "§4", "mallm": "§5"}

_ALARM_OPTIM = [   # §3 Training [V]: HF Trainer adamw_torch, main.yaml, train_alarm_*.sh
    ("optim.lr", 1e-4, "§3 Training: lr 1e-4"),
    ("optim.b1", 0.9, "§3 Training: HF default AdamW (adamw_torch) betas (0.9, 0.999)"),
    ("optim.b2", 0.999, "§3 Training: HF default AdamW (adamw_torch) betas (0.9, 0.999)"),
    ("optim.weight_decay", 0.0, "§3 Training: AdamW weight decay 0"),
    ("optim.warmup_steps", 1500, "§3 Training: warmup 1500"),
    ("optim.clip_norm", 1.0, "§3 Training: max_grad_norm 1"),
    ("data.batch_size", 64, "§3 Training: 4 GPUs x batch 4 x accumulation 4 = effective batch 64"),
    ("data.epochs", 2, "§3 Training: 2 epochs"),
    ("steps", 172380, "§3 Training: AL-Whisper-R ends at step 172,380 (2 x 5.49 M / 64)"),
    ("optim.total_steps", 172380, "§3 Training: cosine over the 2 epochs"),
    ("model.llm", "Qwen3-4B-Thinking-2507", "§3 Architecture: Qwen/Qwen3-4B-Thinking-2507, frozen"),
    ("model.encoders.0.path", "whisper-large-v3", "§3 Architecture: Whisper openai/whisper-large-v3"),
    ("model.encoders.0.taps", [7, 15, 23, 31], "§3 Architecture: Whisper layers [7, 15, 23, 31]"),
    ("model.encoders.0.tap_indexing", "hf", "§3 Architecture: layer indices index HF hidden_states"),
    ("model.connector.adapter_dim", 1024, "§3 adapter: Linear(enc_dim -> 1024)"),
    ("model.connector.adapters.0", "batch", "§3 Encoders table: Whisper DownsamplerConformer, BatchNorm"),
    ("model.encoders.0.window_seconds", 30.0, "§3 Encoders table: Whisper padding trimmed after the 30 s window"),
    ("model.encoders.0.input_convention", "alarm",
     "§3 Architecture [V] src/model/audio/feature_extractor_implementations/whisper.py: the HF attention mask"),
    ("data.max_audio_seconds", 60.0, "§3 Data: audio over 60 s is dropped (two Whisper windows)"),
]
_ALARM_W2V = [
    ("model.encoders.1.path", "w2v-bert-2.0", "§3 Encoders table: W2V-BERT 2.0 facebook/w2v-bert-2.0"),
    ("model.encoders.1.taps", [6, 10, 15, 20, 24], "§3 Encoders table: W2V-BERT layers [6, 10, 15, 20, 24]"),
    ("model.encoders.1.kind", "w2v_bert", "§3 Encoders table: W2V-BERT 2.0"),
    ("model.encoders.1.input_convention", "alarm",
     "§3 Architecture [V] src/model/audio/feature_extractor_implementations/w2vbert.py: 160 zeros each side"),
]
_STAGED = [
    ("model.frozen_mode", "train", "§3 ALARM-CA: adapters loaded frozen (gradients off; HF Trainer train mode)"),
]

# config -> rows (dotted key, published value, digest citation). A path value is matched by its last component.
PUBLISHED_VALUES: dict[str, list[tuple[str, object, str]]] = {
    "desta25_llama31_8b": [
        ("model.llm", "Llama-3.1-8B-Instruct", "§1 Architecture: LLM Llama-3.1-8B-Instruct, frozen, bf16"),
        ("model.dtype", "bfloat16", "§1 Architecture: loaded in bf16; Training: bf16-mixed"),
        ("model.encoders.0.path", "whisper-large-v3", "§1 Architecture: encoder openai/whisper-large-v3"),
        ("model.encoders.0.pad_to_seconds", 30.0, "§1 Architecture: log-mel padded to 30 s (3000 frames)"),
        ("model.encoders.0.taps", [7, 15, 23, 31], "§1 Connector: 0-based indices [7, 15, 23, 31]"),
        ("model.encoders.0.tap_indexing", "blocks", "§1 Connector: raw block outputs, before the final LayerNorm"),
        ("model.connector.kind", "desta", "§1 Connector: qformer_1"),
        ("model.connector.num_queries", 64, "§1 Connector: layer_prompts (1, 64, 1280)"),
        ("model.connector.num_layers", 6, "§1 Connector: 6 layers (Qformer6L)"),
        ("model.connector.hidden", 1280, "§1 Connector: BertEncoder hidden 1280"),
        ("model.connector.num_heads", 20, "§1 Connector: 20 heads"),
        ("model.connector.intermediate", 3072, "§1 Connector: default intermediate size 3072"),
        ("model.connector.dropout", 0.1, "§1 Connector: HF BertEncoder (BertConfig's dropout 0.1)"),
        ("model.connector.transcript_tokens", 100, "§1 Transcript tokens: text field cut to 100 tokens"),
        ("model.lora.rank", 0, "§1 Architecture: use_lora default False (LoRA off)"),
        ("data.batch_size", 96, "§1 Training: 8 GPUs x 12 = global batch 96"),
        ("data.max_text_tokens", 300, "§1 Training: max_seq_length 300"),
        ("data.epochs", 5, "§1 Training: max_epochs 5"),
        ("optim.lr", 1e-4, "§1 Training: lr 1e-4"),
        ("optim.b1", 0.9, "§1 Training: betas (0.9, 0.98)"),
        ("optim.b2", 0.98, "§1 Training: betas (0.9, 0.98)"),
        ("optim.weight_decay", 0.01, "§1 Training: weight decay 0.01"),
        ("optim.warmup_steps", 5000, "§1 Training: cosine with 5,000 warmup steps"),
        ("optim.clip_norm", 1.0, "§1 Training: gradient clipping 1.0"),
        ("steps", 258530, "§1 Training: ~51.7 k steps per epoch x 5 (4,963,845 rows / 96, whole batches)"),
    ],
    "balsa_llama31_8b": [
        ("model.llm", "Llama-3.1-8B-Instruct", "§2 Architecture: LLaMA-3.1-8B-Instruct [S]"),
        ("model.encoders.0.path", "whisper-small", "§2 Architecture: Whisper-small [S]"),
        ("model.connector.kind", "desta", "§2 Architecture: Q-Former + linear projection [P/S]"),
        ("model.lora.rank", 0, "§2 Architecture: frozen encoder and frozen LLM; only the adapter trains [P/S]"),
    ],
    "alarm_whisper_qwen3_4b": [
        *_ALARM_OPTIM,
        ("model.connector.kind", "alarm", "§3: single-encoder model (sum fusion of one stream)"),
        ("model.connector.norm", "batch", "§3 Encoders table: Whisper BatchNorm"),
    ],
    "alarm_ca_qwen3_4b": [
        *_ALARM_OPTIM, *_ALARM_W2V, *_STAGED,
        ("model.connector.kind", "alarm_ca", "§3 ALARM-CA: fusion_type crossattention"),
        ("model.connector.adapters.1", "layer", "§3 Encoders table: W2V-BERT DownsamplerConformer, LayerNorm"),
        ("model.connector.fusion_heads", 16, "§3 ALARM-CA: TransformerDecoderLayer 16 heads"),
        ("model.connector.intermediate", 4096, "§3 ALARM-CA: FFN 4096"),
        ("model.connector.dropout", 0.1, "§3 ALARM-CA: dropout 0.1"),
        ("model.connector.fusion_layers", [1], "§3 ALARM-CA: num_hidden_layers [1, 1, 1]"),
        ("model.freeze", ["connector.adapters.*"], "§3 ALARM-CA: adapters loaded frozen, only the fusion trains"),
        ("model.init_from.0.map", [["connector.adapters.0", "connector.adapters.0"]],
         "§3 ALARM-CA: single-encoder adapters trained first, then loaded (train_alarm_ca.sh)"),
    ],
    "alarm_p_qwen3_4b": [
        *_ALARM_OPTIM, *_ALARM_W2V, *_STAGED,
        ("model.connector.kind", "alarm_p", "§3 ALARM-P: multiperceiver"),
        ("model.connector.adapters.1", "identity", "§3 ALARM-P: identity adapter, no downsampling"),
        ("model.connector.perceiver_latents", 20, "§3 ALARM-P: 20 latents"),
        ("model.connector.perceiver_dim", 768, "§3 ALARM-P: 768 channels"),
        ("model.connector.perceiver_cross_layers", 1, "§3 ALARM-P: 1 cross-attention layer"),
        ("model.connector.perceiver_cross_heads", 4, "§3 ALARM-P: cross-attention with 4 heads"),
        ("model.connector.perceiver_blocks", 3, "§3 ALARM-P: 3 self-attention blocks"),
        ("model.connector.perceiver_block_layers", 6, "§3 ALARM-P: blocks of 6 layers"),
        ("model.connector.perceiver_heads", 4, "§3 ALARM-P: self-attention with 4 heads"),
        ("model.freeze", ["connector.adapters.0"], "§3 ALARM-P: Whisper keeps its pre-trained, frozen 25 Hz stream"),
    ],
    "mats_llama": [
        ("model.llm", "vicuna-7b-v1.5", "§4 Architecture: lmsys/vicuna-7b-v1.5"),
        ("model.encoders.0.kind", "clap", "§4 Architecture: CLAP audio and text encoders, frozen"),
        ("model.connector.kind", "mats", "§4 Architecture: ClipCap-style TransformerMapper"),
        ("model.connector.mapper_tokens", 40, "§4 Mapper: 40 tokens"),
        ("model.connector.num_layers", 8, "§4 Mapper: an 8-layer Transformer"),
        ("model.connector.num_heads", 8, "§4 Mapper: 8 heads"),
        ("model.connector.hidden", 1024, "§4 Mapper: Linear(1024 -> 40 x 1024), width 1024"),
        ("model.connector.noise_variance", 0.015, "§4 Training: noise_variance = 0.015"),
        ("model.lora.rank", 8, "§4 Architecture: LoRA r=8"),
        ("model.lora.alpha", 32.0, "§4 Architecture: LoRA alpha 32"),
        ("model.lora.dropout", 0.1, "§4 Architecture: LoRA dropout 0.1"),
        ("model.lora.target", ".*(q_proj|v_proj).*", "§4 Architecture: q_proj and v_proj [U]"),
        ("data.batch_size", 96, "§4 Hyper-parameters: MATS-LLaMA batch 96 [S]"),
        ("optim.lr", 3e-5, "§4 Hyper-parameters: MATS-LLaMA lr 3e-5, cosine [S]"),
        ("steps", 360000, "§4 Hyper-parameters: MATS-LLaMA 360 k iterations [S]"),
        ("optim.total_steps", 360000, "§4 Hyper-parameters: cosine over the 360 k iterations [S]"),
        ("eval.decoding.kind", "beam", "§4 Decoding [V]: beam search"),
        ("eval.decoding.num_beams", 4, "§4 Decoding [V]: beam 4"),
        ("eval.decoding.no_repeat_ngram_size", 2, "§4 Decoding [V]: no_repeat_ngram_size 2"),
        ("eval.decoding.repetition_penalty", 2.0, "§4 Decoding [V]: repetition penalty 2.0"),
    ],
    "mallm": [
        ("model.lora.rank", 64, "§5: backbone believed fine-tuned with LoRA [U] (Qwen fine-tuning scripts' r 64)"),
        ("data.max_clips", 2, "§5 Method: discriminative training over multiple similar audios (pairs) [P]"),
        ("data.corpus", 2, "§5: joint single-audio and multi-audio (pair) data"),
    ],
}


def _get(cfg_dict: dict, key: str):
    node = cfg_dict
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_carry_the_digest_values(name):
    """Each row: the YAML's value equals the digest's published one (paths by their last component)."""
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    validate_train_config(cfg)
    d = to_dict(cfg)
    for key, want, where in PUBLISHED_VALUES[name]:
        got = _get(d, key)
        if key == "data.corpus":
            assert len(got) == want, (name, key, where)
        elif isinstance(want, str) and key.endswith(("path", "llm")):
            assert Path(got).name == want, (name, key, got, where)
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), (name, key, got, where)
        else:
            assert got == want, (name, key, got, where)
    header = path.read_text().split("\nmodel:")[0]
    assert f"methods-digest {DIGEST[name]}" in header, name   # the header cites the method's settings


def test_every_published_model_has_a_config():
    assert all((CONFIGS / f"{n}.yaml").is_file() for n in PUBLISHED)
    assert set(PUBLISHED_VALUES) == set(PUBLISHED)


# ---- tiny twins: every method knob of the published config, every size shrunk

def tiny_twin(name: str, models: dict, run_dir: Path, runs: dict[str, str] | None = None, steps: int = 3):
    """The published config `name` at tiny size: the tiny LLM / encoders of `models` (one per encoder kind),
    the tiny corpus, every width, count and length shrunk; the method's switches (connector kind and adapters,
    dropout, transcript tokens, LoRA with its dropout, freeze, frozen mode, clip slots, encoders' input
    conventions, optimizer betas and decay) kept. `runs`: published `init_from` run -> a tiny run directory
    (entries without one are dropped)."""
    d = to_dict(load_config(CONFIGS / f"{name}.yaml"))
    m, c, lora, data = d["model"], d["model"]["connector"], d["model"]["lora"], d["data"]
    m["llm"], m["dtype"] = models["llm"], "float32"
    for e in m["encoders"]:
        e["path"] = models[e["kind"]]
        if e["taps"] != [-1]:
            e["taps"] = [0, 1] if e["tap_indexing"] == "blocks" else [1, 2]
        if e["pad_to_seconds"] is not None:
            e["pad_to_seconds"] = 1.0
        if e.get("window_seconds"):            # ALARM's 30 s windows at tiny size: 0.6 s clips make two windows
            e["window_seconds"] = 0.5
    small = dict(num_queries=4, num_layers=1, num_heads=4, hidden=32 if c["hidden"] else 0,
                 intermediate=64 if c["intermediate"] else 0, adapter_dim=16, fusion_heads=4, perceiver_latents=4,
                 perceiver_dim=16, perceiver_heads=2, perceiver_cross_heads=2, perceiver_block_layers=2,
                 mapper_tokens=4, transcript_tokens=min(c["transcript_tokens"], 8), caption_tokens=24)
    c.update({k: v for k, v in small.items() if k in c})
    lora["rank"] = min(lora["rank"], 2)
    m["init_from"] = [dict(i, run=runs[i["run"]]) for i in m["init_from"] if runs and i["run"] in runs]
    corpus = models["text_corpus"] if c["kind"] == "mats" else models["corpus"]   # MATS trains text-only
    data.update(corpus=[corpus] * len(data["corpus"]), batch_size=4, max_text_tokens=96,
                max_audio_seconds=0.6, epochs=0, num_workers=0)
    d["optim"].update(lr=1e-3, warmup_steps=1, total_steps=steps, grad_accum=1)
    d["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1}
    d["checkpoint"].update(dir=str(run_dir / "ckpt"), every=steps, keep_last=1, keep_every=0, async_save=False)
    d["logging"].update(dir=str(run_dir), every=steps, progress="off", tensorboard=False)
    d["steps"] = steps
    out = run_dir / "twin.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml
    out.write_text(yaml.safe_dump(d))
    return load_config(out)


CAPTIONS = ("a dog barks twice", "rain on a metal roof", "a car passes by", "birds sing in the morning",
            "a door closes slowly", "people talk in a cafe", "a bell rings three times", "wind through the trees")


def _text_only_record(i: int):
    """A MATS text-only record: no audio, one caption slot filled from the caption's CLAP text embedding."""
    from alm_jax.data.pipeline import TEXT_AUDIO_PLACEHOLDER
    from alm_jax.data.records import Record
    caption = CAPTIONS[i % len(CAPTIONS)]
    return Record(clips=[], messages=[
        {"role": "user", "content": f"<start_audio>{TEXT_AUDIO_PLACEHOLDER}<end_audio> Describe the audio."},
        {"role": "assistant", "content": caption.capitalize() + "."}], recipe="mats",
        metadata={"text_only": True, "audio_texts": [caption]})


@pytest.fixture(scope="module")
def twin_models(tiny, tmp_path_factory):
    """Tiny directories for every encoder kind the published configs use (a CLAP one with its text tokenizer), next
    to the tiny setup's, and a text-only caption corpus for MATS."""
    from test_alm_clap import TINY_FEATURES
    from test_clap import save_tiny_clap
    from test_mats_training import _save_clap_tokenizer
    from test_w2v_bert import save_tiny_w2v_bert

    from alm_jax.data.corpus import write_corpus
    paths = json.loads((tiny / "paths.json").read_text())
    root = tmp_path_factory.mktemp("twin_models")
    save_tiny_w2v_bert(root / "w2v_bert")
    save_tiny_clap(root / "clap")
    (root / "clap" / "preprocessor_config.json").write_text(json.dumps(
        {**TINY_FEATURES, "truncation": "rand_trunc", "padding": "repeatpad",
         "feature_extractor_type": "ClapFeatureExtractor"}))
    _save_clap_tokenizer(root / "clap", list(CAPTIONS))
    write_corpus(root / "text_corpus", _text_only_record, 16, 8)
    return {"llm": paths["llm"], "corpus": paths["corpus"], "text_corpus": str(root / "text_corpus"),
            "whisper": paths["whisper"], "w2v_bert": str(root / "w2v_bert"), "clap": str(root / "clap")}


def test_tiny_twin_keeps_the_method_and_shrinks_the_sizes(twin_models, tmp_path):
    twin = tiny_twin("alarm_ca_qwen3_4b", twin_models, tmp_path / "ca",
                     runs={"runs/alarm_whisper/checkpoints": "/somewhere"})
    pub = load_config(CONFIGS / "alarm_ca_qwen3_4b.yaml")
    assert twin.model.connector.kind == pub.model.connector.kind and twin.model.connector.adapters == ("batch", "layer")
    assert twin.model.connector.dropout == pub.model.connector.dropout == 0.1
    assert (twin.model.freeze, twin.model.frozen_mode) == (pub.model.freeze, pub.model.frozen_mode)
    assert [i.run for i in twin.model.init_from] == ["/somewhere"]          # the w2v-bert run has no twin
    assert (twin.optim.b2, twin.optim.weight_decay) == (pub.optim.b2, pub.optim.weight_decay)
    assert twin.model.connector.adapter_dim == 16 and twin.data.batch_size == 4
    assert [e.kind for e in twin.model.encoders] == ["whisper", "w2v_bert"]
    assert [e.input_convention for e in twin.model.encoders] == ["alarm", "alarm"]   # ALARM's input rules kept


def _train_twin(name: str, models: dict, run_dir: Path, runs: dict | None = None) -> dict:
    """Trains the twin of `name` for 3 steps; returns its final checkpoint state (nested dicts of arrays)."""
    import orbax.checkpoint as ocp

    from alm_jax.training.trainer import train
    keys = []
    result = train(tiny_twin(name, models, run_dir, runs), batch_transform=lambda i, b: keys.append(set(b)) or b)
    if name == "mats_llama":   # text-only: CLAP text tokens, no waveforms
        assert all("caption_ids" in k and "audio" not in k for k in keys), keys
    assert result.step == 3 and result.stopped_by == "done", name
    assert len(result.losses) == 3 and all(np.isfinite(v) for v in result.losses.values()), (name, result.losses)
    return ocp.StandardCheckpointer().restore(run_dir / "ckpt" / "3" / "state")


@pytest.fixture(scope="module")
def whisper_stage(twin_models, tmp_path_factory):
    """The AL-Whisper twin trained: stage 1 of the ALARM-CA / ALARM-P twins."""
    run_dir = tmp_path_factory.mktemp("twins") / "alarm_whisper_qwen3_4b"
    return run_dir / "ckpt", _train_twin("alarm_whisper_qwen3_4b", twin_models, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_trains_as_a_tiny_twin(name, twin_models, whisper_stage, tmp_path):
    """Each twin trains a few steps with finite losses and optimizer state for what it trains; ALARM-CA and ALARM-P
    start from the AL-Whisper twin's checkpoint (`init_from`), its adapter held fixed as published."""
    stage_dir, stage = whisper_stage
    if name == "alarm_whisper_qwen3_4b":
        state = stage
    else:
        runs = {"runs/alarm_whisper/checkpoints": str(stage_dir), "runs/alarm_whisper_instruct/checkpoints": str(stage_dir)}
        state = _train_twin(name, twin_models, tmp_path / name, runs)
    opt = _opt_connector(state["opt_state"])
    assert opt, name
    if name in ("alarm_ca_qwen3_4b", "alarm_p_qwen3_4b"):
        held, first = state["trainable"]["connector"]["adapters"]["0"], stage["trainable"]["connector"]["adapters"]["0"]
        for mod in first:
            for w in first[mod]:
                np.testing.assert_array_equal(held[mod][w]["value"], first[mod][w]["value"])
        assert "0" not in opt.get("adapters", {}) and "fusion" in opt, name   # held fixed: no optimizer state


def _opt_connector(opt_state) -> dict:
    """The connector part of the first AdamW moment in a restored optimizer state."""
    def find(node):
        if isinstance(node, dict):
            if "mu" in node:
                return node["mu"]["connector"]
            for v in node.values():
                r = find(v)
                if r is not None:
                    return r
        if isinstance(node, (list, tuple)):
            for v in node:
                r = find(v)
                if r is not None:
                    return r
        return None
    return find(opt_state) or {}
