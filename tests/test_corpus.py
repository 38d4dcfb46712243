"""Corpus writer/reader (round trip, resume, multi-process, bad records) and BadDataCounter."""

import json
import os
import pickle

import numpy as np
import pytest

from alm_jax.audio.io import audio_error
from alm_jax.data.bad_data import BadDataCounter, data_error
from alm_jax.data.corpus import Corpus, finalize_manifest, write_corpus
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Provenance, Record
from alm_jax.errors import DataError

N, PER_SHARD = 23, 5  # 5 shards, the last one short


def make_record(i: int) -> Record:
    """Record i, deterministic; every third one carries a short FLAC clip."""
    clips = []
    if i % 3 == 0:
        rng = np.random.default_rng(i)
        clips = [AudioClip.from_wave((0.1 * rng.standard_normal(800 + i)).astype(np.float32), 8000)]
    user = (AUDIO_PLACEHOLDER + " " if clips else "") + f"Question {i}?"
    return Record(clips=clips,
                  messages=[{"role": "user", "content": user}, {"role": "assistant", "content": f"Answer {i}."}],
                  seed_descriptions=[f"seed {i}"], recipe=["desta", "balsa"][i % 2],
                  provenance=Provenance(source=["demo", "libri"][i % 3 == 0], item_id=str(i), seed=i))


def _files(d):
    """name -> bytes of every file in a corpus dir."""
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_round_trip_through_the_corpus(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    c = Corpus(tmp_path)
    assert len(c) == N
    for i in range(N):
        got, want = c[i], make_record(i)
        assert got == want and got.messages == want.messages
        assert [a.data for a in got.clips] == [a.data for a in want.clips]  # byte-identical audio
    assert [r.provenance.item_id for r in c.__getitems__([7, 2, 22])] == ["7", "2", "22"]
    m = c.manifest
    assert m["total_records"] == N and m["schema_version"] == 1 and len(m["shards"]) == 5
    assert [s["name"] for s in m["shards"]][0] == "shard-00000-of-00005.arrayrecord"
    assert [s["count"] for s in m["shards"]] == [5, 5, 5, 5, 3]
    n_audio = len(range(0, N, 3))
    assert m["per_source"] == {"demo": N - n_audio, "libri": n_audio}
    assert m["per_recipe"] == {"balsa": N // 2, "desta": N - N // 2}
    assert m["audio_hours"] * 3600 == pytest.approx(sum(make_record(i).audio_seconds for i in range(N)))
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    with pytest.raises(IndexError):
        c[N]
    assert pickle.loads(pickle.dumps(c))[4] == make_record(4)  # Grain workers pickle data sources


def test_open_reads_no_shard(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    os.remove(tmp_path / "shard-00003-of-00005.arrayrecord")  # opening must not touch the shards
    c = Corpus(tmp_path)
    assert len(c) == N and c[0] == make_record(0)


def test_resume_writes_only_the_missing_shards(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    write_corpus(full, make_record, N, PER_SHARD)

    def dies_in_shard_2(i):
        if i >= 2 * PER_SHARD + 1:
            raise RuntimeError("killed")
        return make_record(i)

    with pytest.raises(RuntimeError, match="killed"):
        write_corpus(part, dies_in_shard_2, N, PER_SHARD)
    done = sorted(n for n in os.listdir(part) if n.endswith(".done.json"))
    assert len(done) == 2 and not os.path.exists(part / "manifest.json")
    with pytest.raises(DataError) as e:
        finalize_manifest(part)
    assert e.value.kind == "incomplete_corpus"

    calls = []
    write_corpus(part, lambda i: calls.append(i) or make_record(i), N, PER_SHARD)
    assert calls == list(range(2 * PER_SHARD, N))  # only the unfinished shards are rewritten
    assert _files(part) == _files(full)  # byte-identical to the uninterrupted write
    calls.clear()
    write_corpus(part, lambda i: calls.append(i) or make_record(i), N, PER_SHARD)
    assert calls == []


def test_resume_rewrites_a_corrupt_shard(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    before = _files(tmp_path)
    path = tmp_path / "shard-00001-of-00005.arrayrecord"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, wrong checksum
    path.write_bytes(bytes(data))
    calls = []
    write_corpus(tmp_path, lambda i: calls.append(i) or make_record(i), N, PER_SHARD)
    assert calls == list(range(PER_SHARD, 2 * PER_SHARD))
    assert _files(tmp_path) == before


def test_two_processes_equal_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    write_corpus(single, make_record, N, PER_SHARD)
    s0 = write_corpus(multi, make_record, N, PER_SHARD, process_index=0, process_count=2)
    s1 = write_corpus(multi, make_record, N, PER_SHARD, process_index=1, process_count=2)
    assert [d["index"] for d in s0] == [0, 2, 4] and [d["index"] for d in s1] == [1, 3]
    assert not os.path.exists(multi / "manifest.json")
    finalize_manifest(multi)
    assert _files(multi) == _files(single)


def test_layout_must_match_on_resume(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    with pytest.raises(DataError, match="records_per_shard"):
        write_corpus(tmp_path, make_record, N, PER_SHARD + 1)


def test_bad_records_are_skipped_and_counted(tmp_path):
    def sometimes_bad(i):
        if i == 4:
            raise audio_error("nonfinite", "NaN in clip")
        if i == 9:
            raise data_error("bad_record", "placeholder mismatch")
        return None if i == 11 else make_record(i)

    write_corpus(tmp_path, sometimes_bad, N, PER_SHARD, max_bad_fraction=0.5)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["total_records"] == N - 3 and m["filtered"] == 1
    assert m["bad_data"]["bad"] == {"bad_record": 1, "nonfinite": 1} and m["bad_data"]["seen"] == N - 1
    assert [r.provenance.item_id for r in Corpus(tmp_path)][:5] == ["0", "1", "2", "3", "5"]


def test_too_many_bad_records_stop_the_write(tmp_path):
    def mostly_bad(i):
        if i % 2:
            raise audio_error("undecodable", f"clip {i} is garbage")
        return make_record(i)

    with pytest.raises(DataError, match="corpus.max_bad_fraction") as e:
        write_corpus(tmp_path, mostly_bad, 400, 100, max_bad_fraction=0.01)
    assert e.value.kind == "too_many_bad"
    assert "undecodable=50" in str(e.value)


# --- BadDataCounter ----------------------------------------------------------------------------------

def test_counter_threshold_merge_and_json():
    a, b = BadDataCounter(), BadDataCounter()
    a.ok(95)
    a.skip("undecodable", "x.flac: lost sync")
    b.ok(3)
    b.skip("nonfinite", "NaN")
    b.skip("undecodable")
    total = a + b
    assert (total.seen, total.total_bad, dict(total.bad)) == (101, 3, {"undecodable": 2, "nonfinite": 1})
    assert a.seen == 96  # `+` does not modify its operands
    total.check(threshold_fraction=0.03)
    with pytest.raises(DataError) as e:
        total.check(threshold_fraction=0.01)
    msg = str(e.value)
    for part in ("3 of 101", "nonfinite=1", "undecodable=2", "1.00%", "data.max_bad_fraction", "lost sync"):
        assert part in msg
    total.check(threshold_fraction=0.01, min_seen=1000)  # too few samples seen to judge
    restored = BadDataCounter.from_dict(json.loads(json.dumps(total.to_dict())))
    assert restored.to_dict() == total.to_dict()
    assert total.metrics()["data/bad/undecodable"] == 2.0


def test_counter_call():
    c = BadDataCounter()
    assert c.call(lambda: 5) == 5
    assert c.call(lambda: (_ for _ in ()).throw(audio_error("empty", "no samples"))) is None
    with pytest.raises(ZeroDivisionError):  # programming errors are not bad data
        c.call(lambda: 1 / 0)
    assert (c.seen, dict(c.bad)) == (2, {"empty": 1})
