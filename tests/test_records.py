"""alm_jax.data.records: byte round trip, unknown-field preservation, malformed records."""

import json
import struct

import numpy as np
import pytest

from alm_jax.data.metadata import ClipMeta, Event, Speech
from alm_jax.data.records import AUDIO_PLACEHOLDER, SCHEMA_VERSION, AudioClip, Provenance, Record
from alm_jax.errors import DataError


def make_record(seed: int = 0) -> Record:
    rng = np.random.default_rng(seed)
    meta = ClipMeta(clip_id="spk1/utt3", source="librispeech", duration=0.5, sample_rate=16000,
                    labels=("speech",), speech=(Speech("hello there", 0.0, 0.5, {"gender": "female"}),),
                    events=(Event("cough", 0.1, 0.2),), attributes={"snr": "high"},
                    label_vocabulary=("speech", "music"))
    clips = [AudioClip.from_wave((0.1 * rng.standard_normal(8000)).astype(np.float32), 16000, "flac", meta),
             AudioClip.from_wave((0.1 * rng.standard_normal((4410, 2))).astype(np.float32), 44100, "pcm16")]
    messages = [{"role": "system", "content": "You are a helpful listener. é ✓"},
                {"role": "user", "content": f"{AUDIO_PLACEHOLDER} and {AUDIO_PLACEHOLDER}: what differs?"},
                {"role": "assistant", "content": "The first is speech, the second is noise."}]
    return Record(clips=clips, messages=messages,
                  seed_descriptions=["[00:00-00:00] hello there (Gender: female)", "|white noise|"],
                  recipe="balsa_ma",
                  provenance=Provenance(source="librispeech", item_id="spk1/utt3",
                                        generator="SmolLM2-135M-Instruct", seed=1234,
                                        created_at="2025-01-02T03:04:05Z"),
                  metadata={"split": "train", "n_tokens": 42})


def test_round_trip_bytes():
    rec = make_record()
    data = rec.to_bytes()
    back = Record.from_bytes(data)
    assert back == rec
    for a, b in zip(back.clips, rec.clips):
        assert a.data == b.data  # byte-identical audio
    assert back.messages == rec.messages
    assert back.schema_version == SCHEMA_VERSION
    assert back.to_bytes() == data
    assert back.clips[0].meta == rec.clips[0].meta
    assert back.clips[1].decode(mono=False).shape == (4410, 2)
    assert back.audio_seconds == pytest.approx(0.6)


def test_audio_is_stored_raw_not_base64():
    rec = make_record()
    data = rec.to_bytes()
    assert data.endswith(rec.clips[0].data + rec.clips[1].data)
    assert len(data) < sum(len(c.data) for c in rec.clips) + 2048


def _head(data: bytes) -> dict:
    return json.loads(data[12:12 + struct.unpack_from("<I", data, 8)[0]])


def _rewrite_json(data: bytes, edit, version: int | None = None) -> bytes:
    magic, layout, res, ver, n = struct.unpack_from("<4sBBHI", data)
    head = json.loads(data[12:12 + n])
    edit(head)
    js = json.dumps(head, separators=(",", ":")).encode()
    return struct.pack("<4sBBHI", magic, layout, res, version or ver, len(js)) + js + data[12 + n:]


def test_unknown_fields_from_a_newer_version_are_preserved():
    def add_unknown(head):
        head["quality_scores"] = {"judge": 0.93}
        head["clips"][0]["loudness_lufs"] = -23.0
        head["clips"][0]["meta"]["language"] = "en"
        head["provenance"]["judge_model"] = "big-judge"

    newer = _rewrite_json(make_record().to_bytes(), add_unknown, version=SCHEMA_VERSION + 3)
    rec = Record.from_bytes(newer)
    assert rec.schema_version == SCHEMA_VERSION + 3
    assert rec.unknown == {"quality_scores": {"judge": 0.93}}
    assert rec.clips[0].unknown == {"loudness_lufs": -23.0}
    assert rec.provenance.unknown == {"judge_model": "big-judge"}
    rec.metadata["touched"] = True  # an older tool edits a known field ...
    back = Record.from_bytes(rec.to_bytes())
    assert back.unknown == rec.unknown and back.clips[0].unknown == rec.clips[0].unknown
    assert back.clips[0].meta_unknown == {"language": "en"}
    assert back.provenance.unknown == {"judge_model": "big-judge"}
    del rec.metadata["touched"]  # ... and without edits it writes back the same fields and audio
    again = rec.to_bytes()
    assert _head(again) == _head(newer) and again[6:8] == newer[6:8]
    assert again.endswith(rec.clips[0].data + rec.clips[1].data) and len(again) - len(newer) == (
        struct.unpack_from("<I", again, 8)[0] - struct.unpack_from("<I", newer, 8)[0])


def _kind(data: bytes) -> str:
    with pytest.raises(DataError) as e:
        Record.from_bytes(data)
    return e.value.kind


def test_malformed_records_raise_data_error_with_kind():
    data = make_record().to_bytes()
    n = struct.unpack_from("<I", data, 8)[0]
    assert _kind(b"XXXX" + data[4:]) == "bad_magic"
    assert _kind(data[:7]) == "truncated"
    assert _kind(data[:12 + n // 2]) == "truncated"
    assert _kind(data[:-10]) == "truncated"
    assert _kind(data[:4] + b"\x09" + data[5:]) == "unsupported_layout"
    assert _kind(data[:12] + b"\xff\xfe" + data[14:]) == "bad_utf8"
    assert _kind(data[:12] + b"[" + data[13:]) == "bad_json"
    assert _kind(data + b"extra") == "bad_record"
    assert _kind(_rewrite_json(data, lambda h: h["messages"].pop(1))) == "bad_record"  # placeholders
    assert _kind(_rewrite_json(data, lambda h: h["messages"][0].update(role="robot"))) == "bad_record"


def test_reserved_byte_is_ignored():
    data = make_record().to_bytes()
    assert Record.from_bytes(data[:5] + b"\x09" + data[6:]) == make_record()


def test_placeholders_must_match_clips():
    rec = make_record()
    rec.messages[1]["content"] = AUDIO_PLACEHOLDER
    with pytest.raises(DataError, match="2 audio clip"):
        rec.to_bytes()
    rec = make_record()
    rec.messages[2]["content"] += AUDIO_PLACEHOLDER
    with pytest.raises(DataError, match="user messages only"):
        rec.to_bytes()


def test_metadata_only_record():
    rec = Record(clips=[], messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert Record.from_bytes(rec.to_bytes()) == rec
