"""A tiny but complete training setup on disk: tiny Llama (with the demo tokenizer) and Whisper HF
directories, a small corpus of short clips (+ a held-out one), and a TrainConfig pointing at them."""

import shutil
from pathlib import Path

import numpy as np

from alm_jax.config import load_config
from alm_jax.data.corpus import write_corpus
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record

SR = 16000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def write_tiny_models(root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel
    torch.manual_seed(0)
    llm_dir, wh_dir = root / "llm", root / "whisper"
    vocab = 49152
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=256)).save_pretrained(llm_dir)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, llm_dir / f)
    WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                               max_source_positions=50, max_target_positions=32, vocab_size=100,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(wh_dir)
    return llm_dir, wh_dir


def make_record(i: int) -> Record:
    r = np.random.default_rng(i)
    n = int(SR * (0.3 + 0.05 * (i % 5)))
    t = np.arange(n) / SR
    wave = (0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 8)) * t) + 0.02 * r.standard_normal(n)).astype(np.float32)
    return Record(clips=[AudioClip.from_wave(wave, SR)],
                  messages=[{"role": "user", "content": f"{AUDIO_PLACEHOLDER} Describe it."},
                            {"role": "assistant", "content": f"A tone number {i % 8}."}], recipe="test")


def write_tiny_setup(root: Path, tokenizer_dir: Path, n_records: int = 48, n_eval: int = 20) -> dict:
    """Models, a training corpus of `n_records` and a held-out corpus of `n_eval` other records."""
    root.mkdir(parents=True, exist_ok=True)
    llm, wh = write_tiny_models(root, tokenizer_dir)
    write_corpus(root / "corpus", make_record, n_records, 16)
    write_corpus(root / "eval_corpus", lambda i: make_record(10_000 + i), n_eval, 16)
    return {"llm": str(llm), "whisper": str(wh), "corpus": str(root / "corpus"),
            "eval_corpus": str(root / "eval_corpus")}


def tiny_config(paths: dict, run_dir: Path, *extra: str):
    return load_config(None, [
        f"model.llm={paths['llm']}", f"model.encoders.0.path={paths['whisper']}",
        "model.encoders.0.pad_to_seconds=null", "model.encoders.0.taps=[0,1]",
        "model.connector.kind=desta", "model.connector.num_queries=4", "model.connector.num_layers=1",
        "model.connector.num_heads=4", "model.connector.hidden=32", "model.connector.intermediate=64",
        f"data.corpus=[{paths['corpus']}]", "data.batch_size=8", "data.max_text_tokens=48",
        "data.max_audio_seconds=0.6", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.total_steps=20",
        f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.every=10", "checkpoint.async_save=false",
        f"logging.dir={run_dir}", "logging.every=5", "logging.progress=off", "logging.tensorboard=false",
        "steps=20", *extra])
