"""The Grain input pipeline: corpus shards -> static-shape training batches.

    ArrayRecord corpus (raw record bytes)
      -> nested data-size subset (a fixed seeded permutation's prefix: fraction 0.1 is inside 0.2)
      -> global seeded shuffle -> repeat(epochs)
      -> shard per process ([process_index::process_count])
      -> build each sample (decode audio: resample to 16 kHz mono, pad/crop per encoder; tokenize the
         messages with the LLM's chat template; placeholder spans of the connector's exact token counts,
         each followed by the clip's transcript tokens when `transcript_tokens` > 0 (DeSTA2.5); loss mask on
         assistant tokens + EOS; an over-long sample cut to T + 1 tokens) -- a bad sample becomes a marker,
         not an exception
      -> [Grain read threads; optional worker processes]
      -> skip-and-count bad markers (count truncated samples), batch with static shapes (waveforms are
         padded here, once)
      -> iterator with `get_state()/set_state()` (exact resume)

A batch (numpy, leading axis = per-process batch B, C = max clips per sample, S = audio samples):
    input_ids `[B, T]` int32     targets `[B, T]` int32 (next token)     loss_mask `[B, T]` float32
    attention_mask `[B, T]` int32 (1 = real token)
    audio_clip `[B, T]` int32: -1 for text, else the clip (0..C-1) of this row whose token sits here
    audio_pos `[B, T]` int32: -1 for text, else the token index within that clip's span
    audio `[B * C, S]` float32 waveforms (log-mel runs on device), audio_samples `[B * C]` int32 (valid
    samples, 0 = empty slot); with `host_features=True`, `audio_features [B * C, n_mels, frames]` instead.
    caption_ids / caption_mask `[B * C, L]` int32 (only when a sample of the batch is text-only, MATS): the CLAP
    text tokens of each slot's caption (L = `model.connector.caption_tokens`; an all-zero mask row: no caption).
    A batch of text-only samples holds no waveforms (no audio / audio_samples / audio_features keys).

Text-only records (MATS, `recipes/mats.py`): no clips; each `TEXT_AUDIO_PLACEHOLDER` ("<audio_text>") of the
messages is a clip slot whose tokens the model makes from the CLAP text embedding of
`record.metadata["audio_texts"][k]` (its caption) instead of audio: the slot gets the connector's fixed span and
the caption's CLAP tokens (`CaptionTokenizer`, the CLAP directory's own tokenizer, padded / cut to L as
LAION-CLAP tokenizes). They need a builder with `captions` (`caption_tokenizer(cfg)`: MATS on a CLAP encoder).

Transcripts (DeSTA2.5, `AudioSpec.transcript_tokens` = `model.connector.transcript_tokens` > 0): clip c's
span is its audio placeholders followed by the first `transcript_tokens` LLM token ids of
`record.metadata["transcripts"][c]` (a single space " " when the clip has no speech: an empty entry or no
`transcripts` key), as DeSTA's dataset cuts its `text` to 100 tokens. The transcript ids are plain text
positions (`audio_clip` -1): the LLM embeds them, which is DeSTA's `embed_tokens(transcription_ids)` written
after the Q-Former tokens.

Over-long samples: a sample of more than T + 1 tokens keeps its first T + 1 (right truncation, as DeSTA's
collator cuts `audio_context + target` to `max_seq_length`; DeSTA's 300 tokens give 299 predictions, our
T = 300 gives 300) and is counted as `truncated` in the data report (`BadDataCounter.adjusted`); only a
sample whose cut leaves no assistant token is dropped (kind `too_long`).

Epochs: with `shuffle`, every epoch is a new permutation (Grain reseeds the shuffle with seed + epoch);
without, every epoch is in record order. A batch may straddle two epochs; with `epochs` set, the last
partial batch is dropped. With several corpora, one epoch ends when the first corpus (relative to its
weight) is used up; the others go on from where they were (each in its own per-epoch permutation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np

from alm_jax.audio.features import log_mel_numpy
from alm_jax.config import TrainConfig
from alm_jax.data.bad_data import BadDataCounter, error_kind
from alm_jax.data.records import AUDIO_PLACEHOLDER, Record
from alm_jax.data.templates import ChatTokenizer, TokenizedSample
from alm_jax.errors import AudioError, ConfigError, DataError
from alm_jax.models.connectors import connector_token_rule

BAD = "__bad__"
TEXT_AUDIO_PLACEHOLDER = "<audio_text>"   # a clip slot filled from a caption's CLAP text embedding (MATS)
TRUNCATED = "__truncated__"   # sample key (a short description) of a sample cut to seq_len + 1 tokens


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """How clips are prepared for the encoders, and how many LLM tokens a clip becomes.

    `pad_to_seconds`: every clip is padded/cropped to exactly this length (DeSTA: 30 s). `None`: clips keep
    their length (ALARM trim) inside a static buffer of `max_seconds`. `tokens_for_samples(n)`: the
    connector's exact token count for a clip of `n` valid samples (its picklable `TokenRule`). Build it
    from a run config with `AudioSpec.from_config` (the one place that decides the buffer).
    `transcript_tokens` > 0: each clip's span is followed by at most that many tokens of its transcript (DeSTA2.5)."""
    tokens_for_samples: Callable[[int], int]
    sample_rate: int = 16000
    pad_to_seconds: float | None = 30.0
    max_seconds: float = 30.0
    transcript_tokens: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "AudioSpec":
        """The spec of a run: the connector kind's token rule, encoder 0's padding, `data.max_audio_seconds`,
        `model.connector.transcript_tokens`."""
        model = cfg.model
        rule = connector_token_rule(model.connector, model.encoders)
        return cls(tokens_for_samples=rule, pad_to_seconds=model.encoders[0].pad_to_seconds,
                   max_seconds=cfg.data.max_audio_seconds, transcript_tokens=model.connector.transcript_tokens)

    @property
    def buffer_samples(self) -> int:
        return int(round((self.pad_to_seconds or self.max_seconds) * self.sample_rate))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int                 # per process
    seq_len: int                    # static text length T (samples longer than T + 1 tokens are truncated)
    max_clips: int = 1              # C: audio slots per sample
    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None       # None = repeat forever
    fraction: float = 1.0           # nested data-size subset
    subset_seed: int = 1234         # the permutation that defines the nested subsets (keep fixed across a study)
    num_workers: int = 0
    read_threads: int = 2           # Grain threads building samples in each process (0: the iterating thread)
    read_buffer: int = 32           # samples built ahead per process (each holds its decoded audio)
    bad_fraction_limit: float = 0.01
    bad_min_seen: int = 100
    process_index: int = 0
    process_count: int = 1


class CaptionTokenizer:
    """Captions -> CLAP text tokens `(ids, mask)` `[n, max_tokens]` int32, padded to `max_tokens` and cut there
    (LAION-CLAP's `tokenizer(text, padding="max_length", truncation=True, max_length=77)`). `tokenizer`: the HF
    tokenizer the CLAP checkpoint ships (RoBERTa's BPE for `laion/clap-*`)."""

    def __init__(self, tokenizer, max_tokens: int = 77):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the CLAP text tokenizer defines no pad token; use the tokenizer the CLAP "
                              "checkpoint ships")
        self.tok, self.max_tokens = tokenizer, int(max_tokens)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                       return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    @property
    def pad_id(self) -> int:
        return int(self.tok.pad_token_id)


def caption_tokenizer(cfg: TrainConfig) -> CaptionTokenizer | None:
    """The caption tokenizer of a MATS run on a CLAP encoder (encoder 0's directory's tokenizer, L =
    `model.connector.caption_tokens`), else None (the run has no text path)."""
    model = cfg.model
    if model.connector.kind != "mats" or model.encoders[0].kind != "clap":
        return None
    from pathlib import Path

    from transformers import AutoTokenizer
    path = model.encoders[0].path
    hint = ("MATS trains on captions through CLAP's text tower and needs the tokenizer files the HF CLAP checkpoint "
            "ships (tokenizer.json, or vocab.json + merges.txt)")
    # (transformers 5 builds an empty RoBERTa tokenizer from a bare CLAP config.json instead of failing)
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise ConfigError(f"model.encoders.0.path={path}: no CLAP text tokenizer there; {hint}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:   # transformers raises OSError / ValueError / TypeError for unreadable files
        raise ConfigError(f"model.encoders.0.path={path}: no CLAP text tokenizer there ({type(e).__name__}: "
                          f"{str(e)[:200]}); {hint}") from None
    return CaptionTokenizer(tok, model.connector.caption_tokens)


class SampleBuilder:
    """Raw record bytes -> one sample dict of numpy arrays (text part + audio part), or a bad marker.

    The audio part is `audio_packed [sum(audio_samples)]`, the clips' valid samples back to back, which
    `collate` pads into the batch's `audio [B * C, S]` (log-mel on device, the default; a 10 s clip in a
    30 s buffer is then copied once, not zero-filled, copied, and copied again), or, with
    `host_features=True`, `audio_features [max_clips, n_mels, frames]` float32: the Whisper log-mel of the
    padded buffer computed here (`log_mel_numpy`, the same math as the model's `log_mel` with
    `pad_to_seconds=audio.pad_to_seconds`; `n_mels` must be the encoder's `num_mel_bins`).
    `captions`: the CLAP caption tokenizer for text-only records (MATS); a text-only sample also holds
    `caption_ids` / `caption_mask` `[max_clips, L]`."""

    def __init__(self, tokenizer: ChatTokenizer, audio: AudioSpec, seq_len: int, max_clips: int, *,
                 host_features: bool = False, n_mels: int = 80, captions: CaptionTokenizer | None = None):
        self.tok, self.audio, self.seq_len, self.max_clips = tokenizer, audio, seq_len, max_clips
        self.host_features, self.n_mels, self.captions = host_features, n_mels, captions

    @property
    def audio_key(self) -> str:
        """The sample key of the audio part: "audio_features" (host log-mel) or "audio_packed" (waveforms)."""
        return "audio_features" if self.host_features else "audio_packed"

    def __call__(self, raw: bytes) -> dict[str, Any]:
        try:
            return self.build(Record.from_bytes(raw))
        except (AudioError, DataError) as e:
            return {BAD: error_kind(e, "bad_record"), "detail": str(e)[:300]}

    def _audio(self, record: Record) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The clips' valid samples concatenated `[sum(valid)]` (or, with `host_features`, the log-mel of
        the padded clips `[max_clips, n_mels, frames]`), valid samples `[max_clips]`, and span lengths."""
        if len(record.clips) > self.max_clips:
            raise _kind("too_many_clips", f"record has {len(record.clips)} clips; max_clips={self.max_clips}")
        spec = self.audio
        n_valid = np.zeros((self.max_clips,), np.int32)
        spans, parts = [], []
        for c, clip in enumerate(record.clips):
            wave = clip.decode(target_sr=spec.sample_rate, mono=True)
            if wave.size == 0:
                raise _kind("empty", "clip decodes to zero samples")
            if not np.all(np.isfinite(wave)):
                raise _kind("nonfinite", "clip holds NaN/inf samples")
            if spec.pad_to_seconds is None and wave.size > spec.buffer_samples:
                raise _kind("too_long", f"clip of {wave.size / spec.sample_rate:.1f} s exceeds max_seconds="
                                        f"{spec.max_seconds}")
            n = min(wave.size, spec.buffer_samples)
            parts.append(wave[:n])
            n_valid[c] = n
            spans.append(int(spec.tokens_for_samples(n)))
        if self.host_features:
            waves = np.zeros((self.max_clips, spec.buffer_samples), np.float32)
            for c, part in enumerate(parts):
                waves[c, :part.size] = part
            feats = log_mel_numpy(waves, n_mels=self.n_mels, sample_rate=spec.sample_rate,
                                  pad_to_seconds=spec.pad_to_seconds, valid_samples=n_valid)
            return feats, n_valid, spans
        packed = parts[0] if len(parts) == 1 else np.concatenate(parts or [np.zeros((0,), np.float32)])
        return packed, n_valid, spans

    def _clips(self, record: Record) -> tuple[list[dict], np.ndarray, np.ndarray, list[int], dict[str, np.ndarray]]:
        """`_audio(record)` with the messages to tokenize, plus, for a text-only record (`metadata
        ["audio_texts"]`, MATS), its caption slots: the placeholders become clip spans of the connector's fixed
        length and the captions' CLAP tokens come as `{"caption_ids", "caption_mask"}` `[max_clips, L]`.
        Returns (messages, audio, valid samples, spans, caption part)."""
        audio, n_valid, spans = self._audio(record)
        texts = record.metadata.get("audio_texts") if isinstance(record.metadata, dict) else None
        if not texts:
            return record.messages, audio, n_valid, spans, {}
        if record.clips:
            raise _kind("bad_record", f"record holds {len(record.clips)} audio clip(s) and metadata.audio_texts; "
                                      "a record is either audio or text-only (MATS)")
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise _kind("bad_record", "metadata.audio_texts must be a list of non-empty strings, got "
                                      f"{str(texts)[:200]}")
        if self.captions is None:
            raise _kind("text_only", "text-only record (MATS: metadata.audio_texts), but this run has no text path; "
                                     "train it with model.connector.kind=mats on a CLAP encoder (model.encoders.0."
                                     "kind=clap)")
        if len(texts) > self.max_clips:
            raise _kind("too_many_clips", f"record has {len(texts)} audio texts; max_clips={self.max_clips}")
        got_ids, got_mask = self.captions(texts)
        ids = np.full((self.max_clips, got_ids.shape[1]), self.captions.pad_id, np.int32)
        mask = np.zeros((self.max_clips, got_ids.shape[1]), np.int32)
        ids[:len(texts)], mask[:len(texts)] = got_ids, got_mask
        messages = [{**m, "content": m["content"].replace(TEXT_AUDIO_PLACEHOLDER, AUDIO_PLACEHOLDER)}
                    if isinstance(m.get("content"), str) else m for m in record.messages]
        spans = [int(self.audio.tokens_for_samples(0))] * len(texts)
        return messages, audio, n_valid, spans, {"caption_ids": ids, "caption_mask": mask}

    def transcript_ids(self, record: Record) -> list[np.ndarray] | None:
        """Per clip, the token ids `[<= transcript_tokens]` int32 of its transcript (`record.metadata
        ["transcripts"]`, " " for a clip without speech), or None when transcripts are off (or the record has no
        audio clips)."""
        cap = self.audio.transcript_tokens
        if cap <= 0 or not record.clips:
            return None
        texts = record.metadata.get("transcripts")
        if texts is None:
            texts = [""] * len(record.clips)
        if not (isinstance(texts, list) and len(texts) == len(record.clips) and all(isinstance(t, str) for t in texts)):
            raise _kind("bad_record", f"metadata.transcripts must be a list of {len(record.clips)} strings (one per "
                                      f"clip), got {str(texts)[:200]}")
        return [ids[:cap] for ids in self.tok.text_ids([t if t.strip() else " " for t in texts])]

    def build_prompt(self, record: Record) -> dict[str, Any]:
        """Tokens of a prompt (messages ending with a user turn + the generation prompt) and its audio."""
        messages, audio, n_valid, spans, captions = self._clips(record)
        s = self.tok.encode(messages, spans, self.transcript_ids(record))
        return {"ids": s.ids, "clip": s.audio_clip, "pos": s.audio_pos, self.audio_key: audio,
                "audio_samples": n_valid, **captions}

    def build(self, record: Record) -> dict[str, Any]:
        messages, audio, n_valid, spans, captions = self._clips(record)
        s = self.tok.encode(messages, spans, self.transcript_ids(record))
        if s.loss_mask[1:].sum() == 0:
            raise _kind("no_target", "sample has no assistant tokens to learn")
        truncated = None
        if len(s) > self.seq_len + 1:
            keep = self.seq_len + 1
            if s.loss_mask[1:keep].sum() == 0:
                raise _kind("too_long", f"the prompt of the sample fills all seq_len + 1 = {keep} tokens (the "
                                        f"sample has {len(s)}); no answer token is left to learn: raise "
                                        "data.max_text_tokens")
            truncated = f"sample of {len(s)} tokens cut to seq_len + 1 = {keep}"
            s = TokenizedSample(ids=s.ids[:keep], loss_mask=s.loss_mask[:keep], audio_clip=s.audio_clip[:keep],
                                audio_pos=s.audio_pos[:keep])
        n = len(s) - 1
        out = {
            "input_ids": _padded(s.ids[:-1], self.seq_len, self.tok.pad_id),
            "targets": _padded(s.ids[1:], self.seq_len, self.tok.pad_id),
            "loss_mask": _padded(s.loss_mask[1:], self.seq_len, 0.0),
            "attention_mask": _padded(np.ones((n,), np.int32), self.seq_len, 0),
            "audio_clip": _padded(s.audio_clip[:-1], self.seq_len, -1),
            "audio_pos": _padded(s.audio_pos[:-1], self.seq_len, -1),
            self.audio_key: audio,
            "audio_samples": n_valid,
            **captions,
        }
        if truncated is not None:
            out[TRUNCATED] = truncated
        return out


def _padded(x: np.ndarray, length: int, value) -> np.ndarray:
    """`x` `[n]` followed by `value` up to `[length]` (n <= length), in x's dtype."""
    out = np.full((length,), value, x.dtype)
    out[:len(x)] = x
    return out


def _kind(kind: str, msg: str) -> DataError:
    e = DataError(msg)
    e.kind = kind
    return e


def _collate_audio(samples: Sequence[dict[str, Any]], buffer_samples: int | None) -> dict[str, np.ndarray]:
    """`audio_samples [B * C]` and either `audio_features [B * C, n_mels, frames]` (stacked) or `audio
    [B * C, S]` (each sample's packed clips written into one zeroed buffer)."""
    n_valid = np.concatenate([s["audio_samples"] for s in samples], 0)
    if "audio_features" in samples[0]:
        return {"audio_features": np.concatenate([s["audio_features"] for s in samples], 0), "audio_samples": n_valid}
    if buffer_samples is None:
        raise ConfigError("collate needs buffer_samples (AudioSpec.buffer_samples) to pad waveforms")
    audio = np.zeros((len(n_valid), buffer_samples), np.float32)
    C = samples[0]["audio_samples"].shape[0]
    for b, s in enumerate(samples):
        start = 0
        for c, n in enumerate(s["audio_samples"].tolist()):
            audio[b * C + c, :n] = s["audio_packed"][start:start + n]
            start += n
    return {"audio": audio, "audio_samples": n_valid}


def _collate_clips(samples: Sequence[dict[str, Any]], buffer_samples: int | None) -> dict[str, np.ndarray]:
    """The clip part of a batch: `_collate_audio`, and `caption_ids` / `caption_mask` `[B * C, L]` when a sample
    holds captions (zeros for the others); a batch with captions and no clip anywhere carries no waveforms."""
    with_text = [s for s in samples if "caption_ids" in s]
    if not with_text:
        return _collate_audio(samples, buffer_samples)
    blank = np.zeros_like(with_text[0]["caption_ids"])
    out = {k: np.concatenate([s.get(k, blank) for s in samples], 0) for k in ("caption_ids", "caption_mask")}
    if any(s["audio_samples"].any() for s in samples):
        out.update(_collate_audio(samples, buffer_samples))
    return out


def collate(samples: Sequence[dict[str, Any]], buffer_samples: int | None = None) -> dict[str, np.ndarray]:
    """Stacks samples into a batch (see module docstring; `audio_clip`/`audio_pos` stay row-local).
    Waveform samples are padded to `buffer_samples` (`AudioSpec.buffer_samples`); host log-mel samples
    (`audio_features`) are stacked as they are."""
    keys = ("input_ids", "targets", "loss_mask", "attention_mask", "audio_clip", "audio_pos")
    out = {k: np.stack([s[k] for s in samples]) for k in keys}
    out.update(_collate_clips(samples, buffer_samples))
    return out


class _SkipBadAndBatch(grain.IterDataset):
    """Drops bad markers (counting them by kind; failing past the limit), counts truncated samples, and
    batches the rest."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate_fn, limit: float, min_seen: int):
        super().__init__(parent)
        self.batch_size, self.collate_fn, self.limit, self.min_seen = batch_size, collate_fn, limit, min_seen

    def __iter__(self):
        return _SkipBadAndBatchIterator(self._parent.__iter__(), self)


class _SkipBadAndBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, cfg: _SkipBadAndBatch):
        super().__init__(parent)
        self.cfg = cfg
        self.bad = BadDataCounter()

    def __next__(self):
        items = []
        while len(items) < self.cfg.batch_size:
            x = next(self._parent)
            if BAD in x:
                self.bad.skip(x[BAD], x.get("detail", ""))
                self.bad.check(self.cfg.limit, self.cfg.min_seen, config_key="data.bad_fraction_limit")
            else:
                self.bad.ok()
                if TRUNCATED in x:
                    self.bad.adjust("truncated")
                items.append(x)
        return self.cfg.collate_fn(items)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "bad": self.bad.to_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.bad = BadDataCounter.from_dict(state["bad"])


def nested_subset_indices(n: int, fraction: float, subset_seed: int) -> np.ndarray:
    """Indices of the `fraction` subset of `n` records: a prefix of one fixed seeded permutation, so the
    subset at a smaller fraction is always contained in the subset at a larger one."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.fraction must be in (0, 1], got {fraction}")
    k = max(1, int(math.floor(n * fraction)))
    return np.sort(np.random.default_rng(subset_seed).permutation(n)[:k])


class _IndexedSource:
    """A random-access view of `source` at `indices` (nested subsets)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def make_dataset(sources: Sequence[Any], builder: SampleBuilder, cfg: PipelineConfig,
                 weights: Sequence[float] | None = None) -> grain.IterDataset:
    """The whole pipeline as a Grain IterDataset of batches. `sources`: random-access sources of raw
    record bytes (e.g. `Corpus(dir).source`); several are mixed with `weights`."""
    if cfg.batch_size <= 0 or cfg.seq_len <= 0:
        raise ConfigError(f"batch_size and seq_len must be positive, got {cfg.batch_size}, {cfg.seq_len}")
    datasets = []
    for i, src in enumerate(sources):
        if cfg.fraction < 1.0:
            src = _IndexedSource(src, nested_subset_indices(len(src), cfg.fraction, cfg.subset_seed + i))
        ds = grain.MapDataset.source(src)
        if cfg.shuffle:
            ds = ds.seed(cfg.seed + 7919 * i).shuffle()
        datasets.append(ds)
    if len(datasets) > 1:
        if weights is None or len(weights) != len(datasets) or min(weights) <= 0:
            raise ConfigError(f"data.weights must give one positive weight per corpus ({len(datasets)}), got {weights}")
        ds = grain.MapDataset.mix(datasets, weights=list(weights))
    else:
        ds = datasets[0]
    ds = ds.repeat(cfg.epochs)
    if cfg.process_count > 1:
        ds = ds[cfg.process_index::cfg.process_count]
    ds = ds.map(builder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    if cfg.num_workers > 0:
        # workers pass arrays under 64 KiB (token rows) through the queue, waveforms via shared memory
        it = grain.experimental.WithOptionsIterDataset(it, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    collate_fn = functools.partial(collate, buffer_samples=builder.audio.buffer_samples)
    return _SkipBadAndBatch(it, cfg.batch_size, collate_fn, cfg.bad_fraction_limit, cfg.bad_min_seen)


def ensure_absl_flags_parsed() -> None:
    """Grain worker processes read absl flags; mark them parsed (ENVIRONMENT.md) before starting workers."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def collate_prompts(builder: SampleBuilder, records: Sequence[Record], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """A left-padded generation batch for `records` whose messages end with a user turn (the model
    answers): input_ids / attention_mask / audio_clip / audio_pos `[B, T]`, audio `[B * C, S]` (or audio_features
    `[B * C, n_mels, frames]` with the builder's `host_features`), audio_samples `[B * C]`."""
    rows = []
    for r in records:
        msgs = [m for m in r.messages if m["role"] != "assistant"] if r.messages[-1]["role"] == "assistant" else r.messages
        prompt = Record(clips=r.clips, messages=msgs, metadata=r.metadata)   # metadata: the clips' transcripts
        s = builder.build_prompt(prompt)
        rows.append(s)
    T = seq_len or max(len(x["ids"]) for x in rows)
    B = len(rows)
    out = {"input_ids": np.full((B, T), builder.tok.pad_id, np.int32), "attention_mask": np.zeros((B, T), np.int32),
           "audio_clip": -np.ones((B, T), np.int32), "audio_pos": -np.ones((B, T), np.int32)}
    for b, x in enumerate(rows):
        n = len(x["ids"])
        if n > T:
            raise DataError(f"prompt of {n} tokens exceeds seq_len={T}")
        out["input_ids"][b, T - n:] = x["ids"]
        out["attention_mask"][b, T - n:] = 1
        out["audio_clip"][b, T - n:] = x["clip"]
        out["audio_pos"][b, T - n:] = x["pos"]
    out.update(_collate_clips(rows, builder.audio.buffer_samples))
    return out
