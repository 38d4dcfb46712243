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


def copy_tokenizer(tokenizer_dir: Path, llm_dir: Path) -> None:
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, Path(llm_dir) / f)


def write_tiny_whisper(path: Path, max_source_positions: int = 50, init_std: float = 0.02) -> Path:
    """A random 2-block Whisper (d 32, 80 mels) saved as an HF directory; `max_source_positions` / 50 seconds of
    audio fit its window. Weights drawn with std `init_std` from torch's global generator (seed it first for fixed
    weights); at HF's default 0.02 its states hardly depend on the audio (about 1% of their norm on short clips, the
    positional embeddings dominate), at 0.3 about half."""
    from transformers import WhisperConfig, WhisperModel
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=max_source_positions, max_target_positions=32, vocab_size=100,
                        init_std=init_std, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(path)
    return Path(path)


def write_tiny_models(root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    llm_dir, wh_dir = root / "llm", root / "whisper"
    vocab = 49152
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=256)).save_pretrained(llm_dir)
    copy_tokenizer(tokenizer_dir, llm_dir)
    write_tiny_whisper(wh_dir, 50)
    return llm_dir, wh_dir


def write_steerable_llm(path: Path, tokenizer_dir: Path, answers, width: int = 64, std: float = 0.1,
                        emb_std: float = 0.1, head_std: float = 3.0, max_positions: int = 256) -> list[int]:
    """A 2-layer random Llama (untied, width `width`, blocks drawn with std `std`, embeddings with `emb_std`) over
    the tokenizer's 49,152-token vocabulary, saved with that tokenizer at `path`; only the tokens of the texts
    `answers` and EOS get an output row (std `head_std`), the others' logits stay 0: a frozen random LLM that a
    connector can steer to peaked answers (a random head over 49k tokens cannot). Seeds torch's generator with 0.
    Returns the ids that got a row."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False, max_position_embeddings=max_positions,
                                      initializer_range=std))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    used = sorted({tok.eos_token_id, *(i for a in answers for i in tok.encode(a, add_special_tokens=False))})
    with torch.no_grad():      # only the answers' tokens get an output row: the others' logits stay 0
        hf.model.embed_tokens.weight.normal_(0.0, emb_std)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[used] = head_std * torch.randn(len(used), width)
    hf.save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return used


class ScriptedBackbone:
    """A generation backbone that answers from a script (no model runs): `answer(decoded prompt) -> text`; the
    prompts come from a real `ResponseGenerator` (`inner`: its tokenizer and chat template, never its model).
    `calls` lists `(prompts, thinking budget)` per `generate` call."""

    def __init__(self, inner, answer, max_new_tokens: int = 8):
        self.inner, self.answer, self.tokenizer, self.name = inner, answer, inner.tokenizer, "scripted"
        self.sampling, self.max_prompt_tokens = inner.sampling, inner.max_prompt_tokens
        self.max_new_tokens, self.tokens_generated, self.calls = max_new_tokens, 0, []

    def prompt_ids(self, messages, assistant_prefix: str = ""):
        return self.inner.prompt_ids(messages, assistant_prefix)

    def generate(self, prompts, row_ids=None, max_new=None, sampling=None):
        from alm_jax.generation.engine import Response
        self.calls.append((len(prompts), sampling.think_budget if sampling is not None else 0))
        return [Response(self.answer(self.tokenizer.decode(p)), 5, True) for p in prompts]


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
