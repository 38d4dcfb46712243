"""The Grain input pipeline: corpus shards -> static-shape training batches.

    ArrayRecord corpus (raw record bytes)
      -> nested data-size subset (a fixed seeded permutation's prefix: fraction 0.1 is inside 0.2)
      -> global seeded shuffle -> repeat(epochs)
      -> shard per process ([process_index::process_count])
      -> build each sample (decode audio: resample to 16 kHz mono, pad/crop per encoder; tokenize the
         messages with the LLM's chat template; placeholder spans of the connector's exact token counts;
         loss mask on assistant tokens + EOS) -- a bad sample becomes a marker, not an exception
      -> [Grain read threads; optional worker processes]
      -> skip-and-count bad markers, batch with static shapes (waveforms are padded here, once)
      -> iterator with `get_state()/set_state()` (exact resume)

A batch (numpy, leading axis = per-process batch B, C = max clips per sample, S = audio samples):
    input_ids `[B, T]` int32     targets `[B, T]` int32 (next token)     loss_mask `[B, T]` float32
    attention_mask `[B, T]` int32 (1 = real token)
    audio_clip `[B, T]` int32: -1 for text, else the clip (0..C-1) of this row whose token sits here
    audio_pos `[B, T]` int32: -1 for text, else the token index within that clip's span
    audio `[B * C, S]` float32 waveforms (log-mel runs on device), audio_samples `[B * C]` int32 (valid
    samples, 0 = empty slot); with `host_features=True`, `audio_features [B * C, n_mels, frames]` instead.

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
from alm_jax.data.records import Record
from alm_jax.data.templates import ChatTokenizer
from alm_jax.errors import AudioError, ConfigError, DataError
from alm_jax.models.connectors import connector_token_rule

BAD = "__bad__"


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """How clips are prepared for the encoders, and how many LLM tokens a clip becomes.

    `pad_to_seconds`: every clip is padded/cropped to exactly this length (DeSTA: 30 s). `None`: clips keep
    their length (ALARM trim) inside a static buffer of `max_seconds`. `tokens_for_samples(n)`: the
    connector's exact token count for a clip of `n` valid samples (its picklable `TokenRule`). Build it
    from a run config with `AudioSpec.from_config` (the one place that decides the buffer)."""
    tokens_for_samples: Callable[[int], int]
    sample_rate: int = 16000
    pad_to_seconds: float | None = 30.0
    max_seconds: float = 30.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "AudioSpec":
        """The spec of a run: the connector kind's token rule, encoder 0's padding, `data.max_audio_seconds`."""
        model = cfg.model
        rule = connector_token_rule(model.connector, model.encoders)
        return cls(tokens_for_samples=rule, pad_to_seconds=model.encoders[0].pad_to_seconds,
                   max_seconds=cfg.data.max_audio_seconds)

    @property
    def buffer_samples(self) -> int:
        return int(round((self.pad_to_seconds or self.max_seconds) * self.sample_rate))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int                 # per process
    seq_len: int                    # static text length T (samples longer than T + 1 tokens are skipped)
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


class SampleBuilder:
    """Raw record bytes -> one sample dict of numpy arrays (text part + audio part), or a bad marker.

    The audio part is `audio_packed [sum(audio_samples)]`, the clips' valid samples back to back, which
    `collate` pads into the batch's `audio [B * C, S]` (log-mel on device, the default; a 10 s clip in a
    30 s buffer is then copied once, not zero-filled, copied, and copied again), or, with
    `host_features=True`, `audio_features [max_clips, n_mels, frames]` float32: the Whisper log-mel of the
    padded buffer computed here (`log_mel_numpy`, the same math as the model's `log_mel` with
    `pad_to_seconds=audio.pad_to_seconds`; `n_mels` must be the encoder's `num_mel_bins`)."""

    def __init__(self, tokenizer: ChatTokenizer, audio: AudioSpec, seq_len: int, max_clips: int, *,
                 host_features: bool = False, n_mels: int = 80):
        self.tok, self.audio, self.seq_len, self.max_clips = tokenizer, audio, seq_len, max_clips
        self.host_features, self.n_mels = host_features, n_mels

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

    def build_prompt(self, record: Record) -> dict[str, Any]:
        """Tokens of a prompt (messages ending with a user turn + the generation prompt) and its audio."""
        audio, n_valid, spans = self._audio(record)
        s = self.tok.encode(record.messages, spans)
        return {"ids": s.ids, "clip": s.audio_clip, "pos": s.audio_pos, self.audio_key: audio,
                "audio_samples": n_valid}

    def build(self, record: Record) -> dict[str, Any]:
        audio, n_valid, spans = self._audio(record)
        s = self.tok.encode(record.messages, spans)
        if len(s) > self.seq_len + 1:
            raise _kind("too_long", f"sample has {len(s)} tokens > seq_len + 1 = {self.seq_len + 1}")
        if s.loss_mask[1:].sum() == 0:
            raise _kind("no_target", "sample has no assistant tokens to learn")
        n = len(s) - 1
        return {
            "input_ids": _padded(s.ids[:-1], self.seq_len, self.tok.pad_id),
            "targets": _padded(s.ids[1:], self.seq_len, self.tok.pad_id),
            "loss_mask": _padded(s.loss_mask[1:], self.seq_len, 0.0),
            "attention_mask": _padded(np.ones((n,), np.int32), self.seq_len, 0),
            "audio_clip": _padded(s.audio_clip[:-1], self.seq_len, -1),
            "audio_pos": _padded(s.audio_pos[:-1], self.seq_len, -1),
            self.audio_key: audio,
            "audio_samples": n_valid,
        }


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


def collate(samples: Sequence[dict[str, Any]], buffer_samples: int | None = None) -> dict[str, np.ndarray]:
    """Stacks samples into a batch (see module docstring; `audio_clip`/`audio_pos` stay row-local).
    Waveform samples are padded to `buffer_samples` (`AudioSpec.buffer_samples`); host log-mel samples
    (`audio_features`) are stacked as they are."""
    keys = ("input_ids", "targets", "loss_mask", "attention_mask", "audio_clip", "audio_pos")
    out = {k: np.stack([s[k] for s in samples]) for k in keys}
    out.update(_collate_audio(samples, buffer_samples))
    return out


class _SkipBadAndBatch(grain.IterDataset):
    """Drops bad markers (counting them by kind; failing past the limit) and batches the rest."""

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
        prompt = Record(clips=r.clips, messages=msgs)
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
    out.update(_collate_audio(rows, builder.audio.buffer_samples))
    return out
