"""Corpus writer/reader (round trip, resume, multi-process, bad records) and BadDataCounter."""

import hashlib
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


def test_open_checks_every_shard_but_opens_no_reader(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    c = Corpus(tmp_path)
    assert c.source._readers == [None] * 5           # readers open on first access
    assert len(c) == N and c[0] == make_record(0)
    os.remove(tmp_path / "shard-00003-of-00005.arrayrecord")
    with pytest.raises(DataError, match="shard-00003-of-00005.arrayrecord is missing") as e:
        Corpus(tmp_path)                             # ... but every shard is checked at open
    assert e.value.kind == "missing_shard"


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


# --- issue 18: settings, confined shard paths, checksums, bad audio, clear errors ---------------------

SETTINGS_A = {"recipe": "desta", "seed": 5, "sampling": {"temperature": 0.8, "max_new_tokens": 8}}
SETTINGS_B = {"recipe": "desta", "seed": 6, "sampling": {"temperature": 0.8, "max_new_tokens": 16}}


def test_resume_with_other_settings_is_refused_before_any_record(tmp_path):
    """Item 3: a corpus records its settings; a rerun with others stops (it used to mix both)."""
    def dies_in_shard_2(i):
        if i >= 2 * PER_SHARD:
            raise RuntimeError("killed")
        return make_record(i)

    with pytest.raises(RuntimeError, match="killed"):
        write_corpus(tmp_path, dies_in_shard_2, N, PER_SHARD, settings=SETTINGS_A, resume_command="make-it --seed 5")
    calls = []
    with pytest.raises(DataError) as e:
        write_corpus(tmp_path, lambda i: calls.append(i) or make_record(i), N, PER_SHARD, settings=SETTINGS_B)
    assert e.value.kind == "settings_mismatch" and calls == []
    msg = str(e.value)
    for part in ("seed: 5 (this run: 6)", "sampling.max_new_tokens: 8 (this run: 16)", "new directory",
                 "make-it --seed 5"):
        assert part in msg
    assert e.value.differences == ["sampling.max_new_tokens: 8 (this run: 16)", "seed: 5 (this run: 6)"]
    write_corpus(tmp_path, make_record, N, PER_SHARD, settings=dict(SETTINGS_A))   # the same settings continue
    c = Corpus(tmp_path)
    assert len(c) == N and c.manifest["settings"] == SETTINGS_A


def test_a_corpus_without_recorded_settings_still_resumes(tmp_path):
    write_corpus(tmp_path, make_record, N, PER_SHARD)                  # no settings (older corpora)
    write_corpus(tmp_path, make_record, N, PER_SHARD, settings=SETTINGS_A)
    assert json.loads((tmp_path / "layout.json").read_text())["settings"] == SETTINGS_A
    with pytest.raises(DataError, match="settings"):
        write_corpus(tmp_path, make_record, N, PER_SHARD, settings=SETTINGS_B)


def test_missing_corpus_directory_says_it_does_not_exist(tmp_path):
    """Item 7: not 'no valid manifest.json'."""
    with pytest.raises(DataError, match="does not exist") as e:
        Corpus(tmp_path / "nope")
    assert e.value.kind == "missing_corpus"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a corpus") as e:
        Corpus(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        Corpus(tmp_path / "file")


def _edit_manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "subdir", "symlink"])
def test_manifest_shard_paths_stay_inside_the_corpus(tmp_path, how):
    """Item 4: a manifest naming another corpus's shard (absolute, ../, a symlink out) is refused by name."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    write_corpus(mine, make_record, N, PER_SHARD)
    write_corpus(other, lambda i: make_record(100 + i), N, PER_SHARD)
    target = other / "shard-00000-of-00005.arrayrecord"
    name = {"absolute": str(target), "dotdot": "../other/shard-00000-of-00005.arrayrecord",
            "subdir": "sub/shard-00000-of-00005.arrayrecord", "symlink": "link.arrayrecord"}[how]
    if how == "symlink":
        os.symlink(target, mine / name)
    entry = json.loads((other / "manifest.json").read_text())["shards"][0]
    _edit_manifest(mine, lambda m: m["shards"].__setitem__(0, {**entry, "name": name}))
    with pytest.raises(DataError) as e:
        Corpus(mine)
    assert e.value.kind == "path_traversal" and repr(name) in str(e.value) and str(mine) in str(e.value)


def test_manifest_pointing_at_a_non_shard_file_is_one_clear_error(tmp_path):
    """Item 4: it used to crash with a raw RuntimeError from the ArrayRecord reader."""
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    layout = tmp_path / "layout.json"
    fake = {"name": "layout.json", "count": 5, "bytes": layout.stat().st_size,
            "sha256": hashlib.sha256(layout.read_bytes()).hexdigest()}
    _edit_manifest(tmp_path, lambda m: m["shards"].__setitem__(0, fake))
    c = Corpus(tmp_path)                 # size and sha256 match what the manifest says ...
    with pytest.raises(DataError, match="cannot read corpus shard .*layout.json") as e:
        c[0]                             # ... but it is no shard
    assert e.value.kind == "corrupt_shard"


def test_shard_sha256_is_checked_on_first_open_and_remembered(tmp_path, monkeypatch):
    """Item 4: the manifest's sha256 values are checked (once per unchanged shard)."""
    import alm_jax.data.corpus as corpus_mod
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    path = tmp_path / "shard-00002-of-00005.arrayrecord"
    good = path.read_bytes()
    data = bytearray(good)
    data[3000] ^= 0x01                   # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00002-of-00005.arrayrecord is damaged") as e:
        Corpus(tmp_path)
    assert e.value.kind == "corrupt_shard" and "rerunning the command" in str(e.value)
    path.write_bytes(good)
    hashed = []
    real = corpus_mod._sha256
    monkeypatch.setattr(corpus_mod, "_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    Corpus(tmp_path)                     # shards 0 and 1 passed during the failed open: remembered
    assert hashed == [f"shard-0000{k}-of-00005.arrayrecord" for k in (2, 3, 4)]
    hashed.clear()
    Corpus(tmp_path)
    assert hashed == []                  # unchanged shards are not hashed again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    Corpus(tmp_path)
    assert hashed == ["shard-00002-of-00005.arrayrecord"]


def test_truncated_shard_is_reported_by_name_at_open(tmp_path):
    """Item 5: it used to be a raw Riegeli RuntimeError once training started reading."""
    write_corpus(tmp_path, make_record, N, PER_SHARD)
    path = tmp_path / "shard-00001-of-00005.arrayrecord"
    path.write_bytes(path.read_bytes()[:70000])
    with pytest.raises(DataError, match="shard-00001-of-00005.arrayrecord is 70000 bytes") as e:
        Corpus(tmp_path)
    assert e.value.kind == "corrupt_shard" and "truncated" in str(e.value)


def _wav(samples, sr=8000, subtype="PCM_16"):
    import io
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_bad_audio_never_enters_a_corpus(tmp_path):
    """Item 6: clips are decoded and checked at write time; bad ones are skipped and counted by kind."""
    good = AudioClip.from_wave(np.full(800, 0.1, np.float32), 8000)
    nan = np.full(800, 0.1, np.float32)
    nan[10] = np.nan
    bad_clips = {
        1: ("undecodable", AudioClip(good.data[: len(good.data) // 2], "flac", 8000, 0.1)),   # truncated FLAC
        2: ("undecodable", AudioClip(b"not audio" * 40, "flac", 8000, 0.1)),                  # garbage
        3: ("nonfinite", AudioClip(_wav(nan, subtype="FLOAT"), "pcm16", 8000, 0.1)),          # NaN
        4: ("empty", AudioClip(_wav(np.zeros(0, np.float32)), "pcm16", 8000, 0.0)),          # no samples
        5: ("too_long", AudioClip(_wav(np.zeros(8000 * 3, np.float32)), "pcm16", 8000, 3.0)),
        6: ("bad_record", AudioClip(good.data, "flac", 16000, 0.1)),                         # header lies
    }

    def record(i):
        rec = make_record(i)
        if i in bad_clips:
            rec.clips = [bad_clips[i][1]]
            rec.messages[0]["content"] = AUDIO_PLACEHOLDER + " what?"
        return rec

    write_corpus(tmp_path, record, 10, 5, max_bad_fraction=1.0, max_audio_seconds=2.0)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["bad_data"]["bad"] == {"bad_record": 1, "empty": 1, "nonfinite": 1, "too_long": 1, "undecodable": 2}
    assert m["total_records"] == 4
    assert [r.provenance.item_id for r in Corpus(tmp_path)] == ["0", "7", "8", "9"]
