"""Batched answers for evaluation (greedy, or beam search per `eval.decoding`): the ALM on audio + text prompts,
the ALM on text alone, or a bare LLM.

    answerer = Answerer(cfg, batch_size=8, max_new_tokens=64)
    texts = answerer.alm(model, records)                    # Records whose messages end with a user turn
    texts = answerer.alm(model, text_records)               # records without clips: the ALM without audio
    answers = answerer.llm(backbone, messages_list)         # a DecoderLM alone (the frozen backbone)

Prompts go through the run's own data path (`data.multihost.sample_builder`: chat template, the connector's
audio spans, encoder 0's padding) and `data.pipeline.collate_prompts` (left-padded), then
`alm_jax.models.alm.generate` (prefill into the KV cache, greedy decode) or, with `eval.decoding.kind: beam`,
`alm_jax.models.beam.beam_generate` (transformers' beam search; the bare LLM's answers use the same settings, the
penalties counting answer tokens only as for the ALM). Shapes are kept static so that one
compiled program serves a whole suite: every batch has `batch_size` rows (the last one is filled with copies
of its first row, whose answers are dropped) and its prompt length is rounded up to a multiple of
`length_bucket` tokens. Answers are cut at the first EOS and decoded without special tokens.

With `model.connector.transcript_tokens` > 0 (DeSTA2.5) every clip's audio tokens are followed by its transcript
tokens. A record that carries `metadata["transcripts"]` uses them (DeSTA's `generate` with a given `text`);
otherwise `WhisperTranscripts` writes them as DeSTA's inference does: a clip the voice-activity gate
(`audio.vad.energy_vad`, the stand-in for Silero VAD) finds speech in is transcribed greedily by the frozen
Whisper whose encoder is encoder 0 (its decoder loaded from the same directory, at most 128 new tokens,
decoded without special tokens and stripped); a clip without speech gets " ". Differences from DeSTA: the gate is
an energy rule, not Silero; a multilingual Whisper (large-v3) transcribes as English (`WhisperTranscripts.
language`; no language detection here); the transcript is cut to `transcript_tokens` as in training (DeSTA cuts
only its training text; at inference Whisper's 128-token limit bounds it).

MATS (`model.connector.kind: mats`): the answers run the audio path with the run's Santa memory when there is one
(`eval.santa`: auto = `<checkpoint.dir>/santa.safetensors`, written by `alm santa`): the CLAP audio embedding is
mixed with its retrieved training captions before the mapper (`MatsConnector.set_santa`, on a view of the model
given; the model itself is left as it is).

Every process runs every prompt (the model's arrays may be sharded over one process's devices); evaluation
of a multi-process run is not split across hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.audio.features import log_mel
from alm_jax.audio.io import read_audio_file, resample
from alm_jax.audio.vad import energy_vad, transcript_or_space
from alm_jax.config import TrainConfig
from alm_jax.data.multihost import sample_builder
from alm_jax.data.pipeline import collate_prompts
from alm_jax.data.records import AudioClip, Record
from alm_jax.errors import ConfigError
from alm_jax.models.alm import generate
from alm_jax.models.beam import BeamSettings, beam_generate, beam_search
from alm_jax.models.connectors.mats import SantaMemory
from alm_jax.models.llm import generate_greedy
from alm_jax.recipes.mats import santa_path

AUDIO_KEYS = ("audio", "audio_samples", "audio_features")
Progress = Callable[[int, int], None]   # (items done, items in all)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer: `text` (decoded, stripped) and `ids` (the generated tokens up to and including the
    first EOS; all `max_new_tokens` of them when none came)."""
    text: str
    ids: tuple[int, ...]


class Answerer:
    """Answers in static-shape batches, decoded as `cfg.eval.decoding` says (see the module docstring).

    cfg: the run config (its LLM tokenizer, connector token rule, audio padding); batch_size: rows per
    generate call; max_new_tokens: answer length limit; length_bucket: prompt lengths round up to this."""

    def __init__(self, cfg: TrainConfig, *, batch_size: int = 8, max_new_tokens: int = 64, length_bucket: int = 64):
        if batch_size < 1 or max_new_tokens < 1 or length_bucket < 1:
            raise ConfigError(f"evaluation batch_size ({batch_size}), max_new_tokens ({max_new_tokens}) and "
                              f"length_bucket ({length_bucket}) must be >= 1")
        self.builder = sample_builder(cfg, cfg.model.llm)
        self.asr = None
        if cfg.model.connector.transcript_tokens > 0:
            if cfg.model.encoders[0].kind != "whisper":
                raise ConfigError("model.connector.transcript_tokens > 0 writes inference transcripts with encoder "
                                  f"0's Whisper decoder, but encoder 0 is {cfg.model.encoders[0].kind!r}; use a "
                                  "Whisper encoder 0 or set model.connector.transcript_tokens=0")
            self.asr = WhisperTranscripts(cfg.model.encoders[0].path, batch_size=batch_size)
        path = santa_path(cfg)
        self.santa = SantaMemory.load(path) if path is not None else None   # MATS inference (see the module doc)
        self.tokenizer = self.builder.tok.tok
        self.eos_id = int(self.builder.tok.eos_id)
        self.pad_id = int(self.builder.tok.pad_id)
        self.batch_size, self.max_new_tokens, self.length_bucket = batch_size, max_new_tokens, length_bucket
        self.beam = beam_settings(cfg, max_new_tokens, self.eos_id)   # None: greedy

    @property
    def sample_rate(self) -> int:
        return self.builder.audio.sample_rate

    @property
    def max_seconds(self) -> float:
        """The longest audio a clip slot holds (encoder 0's padding, else `data.max_audio_seconds`)."""
        return self.builder.audio.buffer_samples / self.builder.audio.sample_rate

    def clip(self, wave: np.ndarray, sample_rate: int) -> AudioClip:
        """A waveform `[samples]` or `[samples, channels]` -> a mono clip at the encoders' rate, cropped to
        `max_seconds`."""
        mono = wave if wave.ndim == 1 else wave.mean(axis=1, dtype=np.float32)
        mono = resample(np.asarray(mono, np.float32), int(sample_rate), self.sample_rate)
        mono = mono[: self.builder.audio.buffer_samples]
        return AudioClip.from_wave(np.ascontiguousarray(mono, np.float32), self.sample_rate, fmt="pcm16")

    def clip_from_file(self, path) -> AudioClip:
        """The first `max_seconds` of an audio file as a clip (raises `AudioError`, kind missing_file, ...)."""
        w = read_audio_file(path, end=self.max_seconds)
        return self.clip(w.samples, w.sample_rate)

    # ---- batching

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _fill(self, rows: list) -> list:
        return rows + [rows[0]] * (self.batch_size - len(rows))

    def _prompt_batch(self, records: Sequence[Record]) -> dict[str, np.ndarray]:
        """`collate_prompts` with the length rounded up to the bucket; text-only batches lose their audio keys
        (so the ALM embeds text alone and runs no encoder)."""
        batch = collate_prompts(self.builder, records)
        t = batch["input_ids"].shape[1]
        width = -(-t // self.length_bucket) * self.length_bucket
        fills = {"input_ids": self.pad_id, "attention_mask": 0, "audio_clip": -1, "audio_pos": -1}
        for k, v in fills.items():
            batch[k] = np.pad(batch[k], ((0, 0), (width - t, 0)), constant_values=v)
        if all(not r.clips for r in records):
            for k in AUDIO_KEYS:
                batch.pop(k, None)
        return batch

    def _answers(self, ids: np.ndarray, n: int) -> list[Answer]:
        out = []
        for row in np.asarray(ids)[:n]:
            row = row.tolist()
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            text = self.tokenizer.decode([t for t in row if t != self.eos_id], skip_special_tokens=True).strip()
            out.append(Answer(text, tuple(int(t) for t in row)))
        return out

    # ---- the three ways to answer

    def with_transcripts(self, model, records: Sequence[Record]) -> list[Record]:
        """`records` with `metadata["transcripts"]` (one per clip) where transcripts are on and a record with
        clips lacks them: written by `WhisperTranscripts` with `model`'s encoder 0 (see the module doc)."""
        records = list(records)
        todo = [i for i, r in enumerate(records) if r.clips and "transcripts" not in r.metadata]
        if self.asr is None or not todo:
            return records
        waves = [c.decode(target_sr=self.sample_rate) for i in todo for c in records[i].clips]
        texts = iter(self.asr(model.encoders[0], waves))
        for i in todo:
            r = records[i]
            records[i] = dataclasses.replace(r, metadata={**r.metadata,
                                                          "transcripts": [next(texts) for _ in r.clips]})
        return records

    def with_santa(self, model):
        """`model` with this answerer's Santa memory on its MATS connector: a view sharing the model's arrays
        (`model` unchanged), or `model` itself when there is no memory."""
        if self.santa is None or not hasattr(model.connector, "set_santa"):
            return model
        view = nnx.merge(*nnx.split(model))
        view.connector.set_santa(self.santa)
        return view

    def alm_answers(self, model, records: Sequence[Record], progress: Progress | None = None) -> list[Answer]:
        """The ALM's answers to `records` (prompts: messages ending with a user turn, audio in clips)."""
        records = self.with_transcripts(model, records)
        model = self.with_santa(model)
        out: list[Answer] = []
        for start, stop in self._batches(len(records)):
            batch = self._prompt_batch(self._fill(list(records[start:stop])))
            arrays = {k: jnp.asarray(v) for k, v in batch.items()}
            if self.beam is not None:
                ids = beam_generate(model, arrays, self.beam)
            else:
                ids = generate(model, arrays, max_new_tokens=self.max_new_tokens, eos_id=self.eos_id)
            out += self._answers(ids, stop - start)
            if progress:
                progress(stop, len(records))
        return out

    def alm(self, model, records: Sequence[Record], progress: Progress | None = None) -> list[str]:
        return [a.text for a in self.alm_answers(model, records, progress)]

    def llm_answers(self, llm, messages: Sequence[Sequence[dict]], progress: Progress | None = None) -> list[Answer]:
        """A bare `DecoderLM`'s answers to text-only chats (the same template and padding as `alm`)."""
        records = self.text_records(messages)
        out: list[Answer] = []
        for start, stop in self._batches(len(records)):
            batch = self._prompt_batch(self._fill(records[start:stop]))
            if self.beam is not None:
                ids = beam_search(llm, batch["input_ids"], batch["attention_mask"], self.beam, prompt_history=False)
            else:
                ids = generate_greedy(llm, batch["input_ids"], batch["attention_mask"],
                                      max_new_tokens=self.max_new_tokens, eos_id=self.eos_id)
            out += self._answers(ids, stop - start)
            if progress:
                progress(stop, len(records))
        return out

    def text_records(self, messages: Sequence[Sequence[dict]]) -> list[Record]:
        return [Record(clips=[], messages=list(m)) for m in messages]

    # ---- teacher-forced KL between two LLMs

    def token_kl(self, reference, other, messages: Sequence[Sequence[dict]], answers: Sequence[Answer]) -> float:
        """Mean over every answer token of KL(reference || other) in nats: each chat + its answer teacher-forced
        through both `DecoderLM`s (text only), compared at the positions that predict the answer's tokens."""
        total, count = 0.0, 0
        ref_def, ref_state = nnx.split(reference)
        oth_def, oth_state = nnx.split(other)
        for start, stop in self._batches(len(messages)):
            recs = self._fill(self.text_records(messages[start:stop]))
            ans = list(answers[start:stop]) + [answers[start]] * (self.batch_size - (stop - start))
            prompt = collate_prompts(self.builder, recs)
            width = -(-(prompt["input_ids"].shape[1] + self.max_new_tokens) // self.length_bucket) * self.length_bucket
            ids = np.full((len(recs), width), self.pad_id, np.int32)
            mask = np.zeros((len(recs), width), np.int32)
            scored = np.zeros((len(recs), width), np.float32)   # 1 at positions whose next token is an answer token
            for b, a in enumerate(ans):
                row = np.concatenate([prompt["input_ids"][b][prompt["attention_mask"][b] == 1],
                                      np.asarray(a.ids, np.int32)])
                ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
                if b < stop - start:
                    scored[b, width - len(a.ids) - 1: width - 1] = 1.0
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
            kl = _kl_sum(_log_softmax(ref_def, ref_state, ids, mask), _log_softmax(oth_def, oth_state, ids, mask),
                         jnp.asarray(scored))
            total += float(kl)
            count += int(scored.sum())
        return total / count if count else 0.0


def beam_settings(cfg: TrainConfig, max_new_tokens: int, eos_id: int) -> BeamSettings | None:
    """`eval.decoding` as beam search settings, or None for greedy decoding."""
    d = cfg.eval.decoding
    if d.kind == "greedy":
        return None
    try:
        return BeamSettings(num_beams=d.num_beams, max_new_tokens=max_new_tokens, eos_id=eos_id,
                            no_repeat_ngram_size=d.no_repeat_ngram_size, repetition_penalty=d.repetition_penalty,
                            length_penalty=d.length_penalty, early_stopping=d.early_stopping)
    except ConfigError as e:
        raise ConfigError(f"eval.decoding: {e}; fix the eval.decoding keys") from e


class WhisperTranscripts:
    """DeSTA2.5's inference transcripts: `transcripts(encoder, waves)` -> one string per waveform (16 kHz
    `[samples]`): Whisper's greedy transcript (stripped) of a clip `energy_vad` finds speech in, " " otherwise.

    `encoder`: the frozen `WhisperEncoder` of `whisper_dir` (the ALM's encoder 0); the decoder, its generation
    settings (`language` for a multilingual model: no language detection here) and tokenizer load from
    `whisper_dir` on first use. Clips go through in batches of `batch_size` rows (the last one filled), each
    padded to the encoder's window (30 s for Whisper) as Whisper's feature extractor pads; at most
    `max_new_tokens` tokens per transcript (DeSTA: 128)."""

    def __init__(self, whisper_dir: str, *, batch_size: int = 8, max_new_tokens: int = 128, language: str = "en"):
        self.whisper_dir, self.batch_size, self.max_new_tokens = str(whisper_dir), batch_size, max_new_tokens
        self.language = language
        self._loaded = None

    def _load(self, encoder):
        if self._loaded is None:
            from transformers import AutoTokenizer

            from alm_jax.weights.whisper_params import load_generation_config, load_whisper_decoder
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.whisper_dir)
            except (OSError, ValueError) as e:
                raise ConfigError(f"inference transcripts need the Whisper tokenizer in {self.whisper_dir} "
                                  f"(model.encoders.0.path): {e}") from e
            self._loaded = (load_whisper_decoder(self.whisper_dir, dtype=encoder.dtype),
                            load_generation_config(self.whisper_dir, language=self.language), tokenizer)
        return self._loaded

    def __call__(self, encoder, waves: Sequence[np.ndarray]) -> list[str]:
        from alm_jax.models.whisper_decoder import transcribe
        if not waves:
            return []
        seconds = 2 * encoder.config.max_source_positions * 160 / 16000    # the encoder's window (30 s)
        window = int(round(seconds * 16000))
        audio = np.zeros((len(waves), window), np.float32)
        valid = np.zeros((len(waves),), np.int32)
        for k, w in enumerate(waves):
            n = min(len(w), window)
            audio[k, :n], valid[k] = w[:n], n
        has_speech = np.asarray(energy_vad(audio, valid))
        speech = [k for k in range(len(waves)) if has_speech[k]]
        texts = [""] * len(waves)
        if speech:
            decoder, gen, tokenizer = self._load(encoder)
            for start in range(0, len(speech), self.batch_size):
                rows = speech[start:start + self.batch_size]
                rows_full = rows + [rows[0]] * (self.batch_size - len(rows))
                feats = log_mel(jnp.asarray(audio[rows_full]), n_mels=encoder.config.num_mel_bins,
                                pad_to_seconds=seconds)
                tokens, lengths = transcribe(encoder, decoder, feats, gen, max_new_tokens=self.max_new_tokens)
                tokens, lengths = np.asarray(tokens), np.asarray(lengths)
                for j, k in enumerate(rows):
                    texts[k] = tokenizer.decode(tokens[j, :lengths[j]].tolist(), skip_special_tokens=True).strip()
        return transcript_or_space(has_speech, texts)


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(graphdef, state, ids, mask):
    """log-probabilities `[b, t, vocab]` float32 of a DecoderLM on ids / mask `[b, t]`."""
    llm = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(llm(ids, attention_mask=mask).astype(jnp.float32), axis=-1)


@jax.jit
def _kl_sum(p, q, weight):
    """sum over `[b, t]` of weight * KL(p || q), p / q log-probabilities `[b, t, vocab]`."""
    return jnp.sum(weight * jnp.sum(jnp.exp(p) * (p - q), axis=-1))
