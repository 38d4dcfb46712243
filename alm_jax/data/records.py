"""The corpus record: audio clip(s) + chat messages + seed descriptions + provenance, versioned.

Wire format of one record (one ArrayRecord entry), little-endian:

    b"ALMR" | u8 layout (=1) | u8 reserved (=0) | u16 schema_version | u32 json_len
    | json_len bytes of UTF-8 JSON (every structured field) | the clips' audio bytes, concatenated

The JSON gives each clip's byte count (`nbytes`), so audio is stored raw (no base64) and sliced out
without copying the JSON. Keys this version does not know, at the top level, in a clip, in a clip's
metadata or in the provenance, are kept on read and written back unchanged, so an older tool can pass
newer records through. A malformed record raises `DataError` with a `kind`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from alm_jax.audio import io as audio_io
from alm_jax.data.bad_data import data_error
from alm_jax.data.metadata import ClipMeta
from alm_jax.errors import AudioError, DataError

SCHEMA_VERSION = 1
LAYOUT_VERSION = 1
MAGIC = b"ALMR"
AUDIO_PLACEHOLDER = "<audio>"
ROLES = ("system", "user", "assistant")

_HEADER = struct.Struct("<4sBBHI")
_CLIPMETA_FIELDS = frozenset(f.name for f in dataclasses.fields(ClipMeta))


@dataclasses.dataclass
class AudioClip:
    """One encoded clip. `data`: FLAC or PCM16-WAV bytes; `duration` in seconds."""
    data: bytes
    format: str
    sample_rate: int
    duration: float
    meta: ClipMeta | None = None
    unknown: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    meta_unknown: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_wave(cls, samples: np.ndarray, sample_rate: int, fmt: str = "flac",
                  meta: ClipMeta | None = None) -> "AudioClip":
        """Encode float32 samples [samples] or [samples, channels] into a clip."""
        data = audio_io.encode_audio(samples, sample_rate, fmt)
        return cls(data, fmt, int(sample_rate), samples.shape[0] / sample_rate, meta)

    def decode(self, target_sr: int | None = None, mono: bool = True,
               max_seconds: float = audio_io.DEFAULT_MAX_SECONDS) -> np.ndarray:
        """float32 [samples] (mono) or [samples, channels]; see `audio_io.decode_audio`."""
        return audio_io.decode_audio(self.data, target_sr=target_sr, mono=mono, max_seconds=max_seconds)

    def check(self, max_seconds: float = audio_io.DEFAULT_MAX_SECONDS) -> None:
        """Decode the clip: `AudioError` (kind `undecodable`, `nonfinite`, `empty`, `too_long`) unless it is
        usable audio of at most `max_seconds`; `DataError` kind `bad_record` when its format is unknown or
        its sample rate / duration differ from what the clip says."""
        if self.format not in audio_io.FORMATS:
            raise data_error("bad_record", f"clip format {self.format!r} is not one of {audio_io.FORMATS}")
        wave = audio_io.decode_waveform(self.data, max_seconds=max_seconds)
        if wave.sample_rate != self.sample_rate:
            raise data_error("bad_record", f"clip says {self.sample_rate} Hz, its audio is {wave.sample_rate} Hz")
        if abs(wave.duration - self.duration) > max(1.0 / wave.sample_rate, 1e-3):
            raise data_error("bad_record", f"clip says {self.duration:.3f} s, its audio decodes to "
                                           f"{wave.duration:.3f} s")

    def _header(self) -> dict[str, Any]:
        d = {**self.unknown, "format": self.format, "sample_rate": self.sample_rate,
             "duration": self.duration, "nbytes": len(self.data)}
        if self.meta is not None or self.meta_unknown:
            d["meta"] = {**(self.meta.to_dict() if self.meta else {}), **self.meta_unknown}
        return d


@dataclasses.dataclass
class Provenance:
    """Where a record came from: source dataset + item id, the model that wrote the target, its seed."""
    source: str = ""
    item_id: str = ""
    generator: str = ""
    seed: int | None = None
    created_at: str | None = None
    unknown: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        return {**self.unknown, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Provenance":
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   unknown={k: v for k, v in d.items() if k not in known})


@dataclasses.dataclass
class Record:
    """One training example.

    `messages`: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; the user messages hold
    exactly one `AUDIO_PLACEHOLDER` per clip, in clip order. `recipe` names the recipe that made it.
    """
    clips: list[AudioClip]
    messages: list[dict[str, Any]]
    seed_descriptions: list[str] = dataclasses.field(default_factory=list)
    recipe: str = ""
    provenance: Provenance = dataclasses.field(default_factory=Provenance)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    unknown: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def audio_seconds(self) -> float:
        return sum(c.duration for c in self.clips)

    def validate(self) -> None:
        """Raise `DataError` (kind `bad_record`) if messages or placeholders are inconsistent."""
        n_placeholders = 0
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise data_error("bad_record", f"message {i} must be {{'role': one of {ROLES}, "
                                               f"'content': str}}, got {str(m)[:200]}")
            count = m["content"].count(AUDIO_PLACEHOLDER)
            if count and m["role"] != "user":
                raise data_error("bad_record", f"message {i} ({m['role']}) holds {AUDIO_PLACEHOLDER}; "
                                               "audio placeholders belong in user messages only")
            n_placeholders += count
        if n_placeholders != len(self.clips):
            raise data_error("bad_record", f"record has {len(self.clips)} audio clip(s) but "
                                           f"{n_placeholders} {AUDIO_PLACEHOLDER} placeholder(s)")
        for c in self.clips:
            if c.format not in audio_io.FORMATS:
                raise data_error("bad_record", f"clip format {c.format!r} is not one of {audio_io.FORMATS}")

    def check_audio(self, max_seconds: float = audio_io.DEFAULT_MAX_SECONDS) -> None:
        """Decode and check every clip (`AudioClip.check`); the error names the clip."""
        for k, c in enumerate(self.clips):
            try:
                c.check(max_seconds)
            except (AudioError, DataError) as e:
                err = type(e)(f"clip {k}: {e}")
                err.kind = getattr(e, "kind", None)
                raise err from None

    def to_bytes(self) -> bytes:
        """Serialize (validates first)."""
        self.validate()
        head = {**self.unknown,
                "clips": [c._header() for c in self.clips],
                "messages": self.messages,
                "seed_descriptions": self.seed_descriptions,
                "recipe": self.recipe,
                "provenance": self.provenance.to_dict(),
                "metadata": self.metadata}
        js = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return b"".join([_HEADER.pack(MAGIC, LAYOUT_VERSION, 0, self.schema_version, len(js)), js,
                         *(c.data for c in self.clips)])

    @classmethod
    def from_bytes(cls, data: bytes) -> "Record":
        """Parse bytes written by `to_bytes` (by this or a newer schema version)."""
        head, blobs = _split(data)
        try:
            clips = [_clip_from(c, blob) for c, blob in zip(head.pop("clips"), blobs)]
            rec = cls(clips=clips,
                      messages=head.pop("messages"),
                      seed_descriptions=head.pop("seed_descriptions", []),
                      recipe=head.pop("recipe", ""),
                      provenance=Provenance.from_dict(head.pop("provenance", {})),
                      metadata=head.pop("metadata", {}),
                      schema_version=struct.unpack_from("<H", data, 6)[0],
                      unknown=head)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise data_error("bad_record", f"record fields are malformed: {type(e).__name__}: {e}") from None
        rec.validate()
        return rec


def _split(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Header dict and the clips' audio bytes of a serialized record."""
    if len(data) < _HEADER.size:
        raise data_error("truncated", f"record is {len(data)} bytes, shorter than its "
                                      f"{_HEADER.size}-byte header")
    magic, layout, _, _, json_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise data_error("bad_magic", f"not an alm_jax record (magic {magic!r}, expected {MAGIC!r})")
    if layout != LAYOUT_VERSION:
        raise data_error("unsupported_layout", f"record layout {layout} is not supported (this version "
                                               f"reads layout {LAYOUT_VERSION}); upgrade alm_jax")
    end = _HEADER.size + json_len
    if len(data) < end:
        raise data_error("truncated", f"record is {len(data)} bytes, its header needs {end}")
    try:
        head = json.loads(data[_HEADER.size:end].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise data_error("bad_utf8", f"record JSON is not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise data_error("bad_json", f"record JSON is malformed: {e}") from None
    if not isinstance(head, dict) or not isinstance(head.get("clips"), list) or "messages" not in head:
        raise data_error("bad_record", "record JSON must be an object with 'clips' and 'messages'")
    blobs, pos = [], end
    for c in head["clips"]:
        n = c.get("nbytes") if isinstance(c, dict) else None
        if not isinstance(n, int) or n < 0:
            raise data_error("bad_record", f"clip entry lacks a valid 'nbytes': {str(c)[:200]}")
        blobs.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        kind = "truncated" if pos > len(data) else "bad_record"
        raise data_error(kind, f"record audio section is {len(data) - end} bytes, clips declare {pos - end}")
    return head, blobs


def _clip_from(d: dict[str, Any], blob: bytes) -> AudioClip:
    d = dict(d)
    d.pop("nbytes")
    meta_d = d.pop("meta", None)
    meta, meta_unknown = None, {}
    if meta_d is not None:
        known = {k: v for k, v in meta_d.items() if k in _CLIPMETA_FIELDS}
        meta_unknown = {k: v for k, v in meta_d.items() if k not in _CLIPMETA_FIELDS}
        meta = ClipMeta.from_dict(known) if known else None
    return AudioClip(data=blob, format=d.pop("format"), sample_rate=d.pop("sample_rate"),
                     duration=d.pop("duration"), meta=meta, unknown=d, meta_unknown=meta_unknown)
