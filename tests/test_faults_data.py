"""Fault injection over the files alm_jax reads (issue 18): safetensors weights, corpus ArrayRecord shards,
manifest.json (with layout.json and the shards' .done.json), FLAC/WAV audio. Every fault either recovers
exactly (the rerun / rebuild gives byte-identical files) or stops with one clear error (an `AlmError`
subclass, never a library's raw exception) naming the file and what to do.

| file                 | fault                                             | outcome                                                    |
|----------------------|---------------------------------------------------|------------------------------------------------------------|
| model.safetensors    | truncated to half                                 | stop: WeightImportError "<file> is not a readable safetensors file ... download it again" (`alm info` rc 1; load_llm, i.e. `alm train`) |
| model.safetensors    | cut inside the header (20 bytes)                  | stop: same                                                 |
| model.safetensors    | empty file                                        | stop: same                                                 |
| model.safetensors    | header byte flipped                               | stop: same                                                 |
| model.safetensors    | its index lists a shard that is missing           | stop: WeightImportError "missing checkpoint shard/file <file>" |
| model.safetensors    | one byte flipped inside tensor data               | NOT DETECTED: loads (safetensors carries no checksum)      |
| shard .arrayrecord   | truncated                                         | stop at open: DataError corrupt_shard "<shard> is N bytes, the manifest records M (truncated or damaged); rewrite it by rerunning ..."; rerun -> exact |
| shard                | one byte flipped (same size)                      | stop at first open: corrupt_shard "<shard> is damaged (its sha256 ...)"; rerun -> exact |
| shard                | replaced by garbage of the same size              | stop at open (sha256); rerun -> exact                      |
| shard                | bytes appended                                    | stop at open (size); rerun -> exact                        |
| shard                | deleted                                           | stop at open: missing_shard "<shard> is missing"; rerun -> exact |
| shard                | byte flipped after its hash was remembered (mtime kept) | stop at the first read, also inside the Grain training pipeline: corrupt_shard "cannot read corpus shard <shard>: ..." |
| shard                | any of the above, `alm corpus verify`             | rc 1, one line naming each damaged shard; intact corpus rc 0 |
| manifest.json        | truncated / empty / not JSON                      | stop: bad_manifest "<manifest> is damaged ... `alm corpus finalize DIR`"; finalize -> exact |
| manifest.json        | deleted                                           | stop: incomplete_corpus "unfinished ..."; finalize -> exact |
| manifest.json        | wrong format / entry without sha256 / duplicate entry | stop: bad_manifest naming the manifest                |
| manifest.json        | shard path absolute / `../`                       | stop: path_traversal naming the entry and the corpus      |
| manifest.json        | a shard's count too large                         | stop at the first read: corrupt_shard "holds 5 records, manifest.json says 6" |
| layout.json          | truncated                                         | resume stops: bad_layout "<layout> is damaged ..."        |
| .done.json           | truncated                                         | resume rewrites that shard -> exact                        |
| FLAC/WAV, JSONL scan | truncated FLAC, truncated WAV, garbage, NaN float WAV, empty, header only | skipped and counted by kind (undecodable / nonfinite / empty); the good files pass |
| FLAC/WAV, write_corpus | the same bytes as clips                         | record skipped, counted in manifest bad_data by kind; the other records written |
"""

import argparse
import io
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
import soundfile as sf

from alm_jax.data.corpus import Corpus, write_corpus
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Provenance, Record
from alm_jax.data.sources.jsonl import JsonlSource
from alm_jax.data.verify import add_parser
from alm_jax.errors import AlmError, DataError, WeightImportError

N, PER_SHARD = 12, 4
SHARD1 = "shard-00001-of-00003.arrayrecord"


def make_record(i: int) -> Record:
    wave = (0.1 * np.random.default_rng(i).standard_normal(400 + 10 * i)).astype(np.float32)
    return Record(clips=[AudioClip.from_wave(wave, 8000)],
                  messages=[{"role": "user", "content": f"{AUDIO_PLACEHOLDER} What is {i}?"},
                            {"role": "assistant", "content": f"It is {i}."}],
                  provenance=Provenance(source="faults", item_id=str(i)))


def files(d) -> dict[str, bytes]:
    """Every corpus file but the reader's `.verified.json` memo."""
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n != ".verified.json"}


def alm_corpus(*argv: str) -> int:
    """`alm corpus ...` as `alm_jax.cli.main` runs it (AlmError -> message + rc 1)."""
    p = argparse.ArgumentParser(prog="alm")
    add_parser(p.add_subparsers())
    args = p.parse_args(["corpus", *argv])
    try:
        return int(args.func(args) or 0)
    except AlmError as e:
        print(f"alm: error: {e}", file=sys.stderr)
        return 1


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine") / "corpus"
    write_corpus(d, make_record, N, PER_SHARD)
    return d


@pytest.fixture
def corpus(pristine, tmp_path):
    d = tmp_path / "corpus"
    shutil.copytree(pristine, d)
    return d


# --- corpus shards -------------------------------------------------------------------------------------

def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


SHARD_FAULTS = {
    "truncated": (lambda b: b[: len(b) // 2], "corrupt_shard", "bytes, the manifest records"),
    "byte_flipped": (lambda b: _flip(b, 3000), "corrupt_shard", "is damaged (its sha256"),
    "garbage_same_size": (lambda b: os.urandom(len(b)), "corrupt_shard", "is damaged (its sha256"),
    "bytes_appended": (lambda b: b + b"\0" * 10, "corrupt_shard", "bytes, the manifest records"),
    "deleted": (None, "missing_shard", "is missing"),
}


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_damaged_shard_stops_at_open_and_a_rerun_recovers_exactly(pristine, corpus, fault, capsys):
    edit, kind, text = SHARD_FAULTS[fault]
    path = corpus / SHARD1
    if edit is None:
        path.unlink()
    else:
        path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(DataError) as e:
        Corpus(corpus)
    msg = str(e.value)
    assert e.value.kind == kind and f"shard {SHARD1} " in msg and text in msg, msg
    assert "rerunning the command that wrote" in str(e.value)
    capsys.readouterr()
    assert alm_corpus("verify", str(corpus)) == 1
    err = capsys.readouterr().err
    assert err.count("alm corpus verify:") == 1 and SHARD1 in err
    write_corpus(corpus, make_record, N, PER_SHARD)               # the fix the message gives
    assert files(corpus) == files(pristine)
    assert alm_corpus("verify", str(corpus), "--records") == 0
    assert len(Corpus(corpus)) == N


def test_shard_damaged_after_its_check_stops_the_training_pipeline(corpus, demo_tokenizer):
    from alm_jax.data.pipeline import AudioSpec, PipelineConfig, SampleBuilder, make_dataset
    from alm_jax.data.templates import ChatTokenizer
    Corpus(corpus)                                                # hashes checked and remembered
    path = corpus / SHARD1
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(_flip(data, data.find(b"What is 5?")))      # inside record 5's chunk
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))           # same size and mtime: not re-hashed
    builder = SampleBuilder(ChatTokenizer(demo_tokenizer), AudioSpec(lambda n: 1, pad_to_seconds=None,
                                                                     max_seconds=1.0), 48, 1)
    ds = make_dataset([Corpus(corpus).source], builder, PipelineConfig(batch_size=4, seq_len=48, shuffle=False,
                                                                       epochs=1))
    with pytest.raises(DataError, match=f"cannot read corpus shard .*{SHARD1}: Corrupted Riegeli") as e:
        list(ds)
    assert e.value.kind == "corrupt_shard" and "rerunning the command" in str(e.value)


# --- manifest.json, layout.json, .done.json ------------------------------------------------------------

def _manifest_edit(fn):
    def edit(text: str) -> str:
        m = json.loads(text)
        fn(m)
        return json.dumps(m)
    return edit


MANIFEST_FAULTS = {
    "truncated": (lambda t: t[: len(t) // 2], "bad_manifest", "is damaged: not valid JSON", True),
    "empty": (lambda t: "", "bad_manifest", "is damaged: not valid JSON", True),
    "not_json": (lambda t: "shards: []", "bad_manifest", "is damaged: not valid JSON", True),
    "deleted": (None, "incomplete_corpus", "is unfinished", True),
    "wrong_format": (_manifest_edit(lambda m: m.update(format="other")), "bad_manifest", "not an alm_jax corpus", True),
    "entry_without_sha256": (_manifest_edit(lambda m: m["shards"][1].pop("sha256")), "bad_manifest",
                             "shard entry 1", True),
    "duplicate_entry": (_manifest_edit(lambda m: m["shards"].append(m["shards"][0])), "bad_manifest", "twice", True),
    "absolute_path": (_manifest_edit(lambda m: m["shards"][1].update(name="/etc/passwd")), "path_traversal",
                      "'/etc/passwd' is not a file name inside", True),
    "dotdot_path": (_manifest_edit(lambda m: m["shards"][1].update(name=f"../x/{SHARD1}")), "path_traversal",
                    f"'../x/{SHARD1}' is not a file name inside", True),
}


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_damaged_manifest_stops_with_one_message_and_finalize_recovers(pristine, corpus, fault):
    edit, kind, text, rebuildable = MANIFEST_FAULTS[fault]
    path = corpus / "manifest.json"
    if edit is None:
        path.unlink()
    else:
        path.write_text(edit(path.read_text()))
    with pytest.raises(DataError) as e:
        Corpus(corpus)
    assert e.value.kind == kind and text in str(e.value), str(e.value)
    assert f"alm corpus finalize {corpus}" in str(e.value)          # names the corpus and the fix
    assert alm_corpus("verify", str(corpus)) == 1
    assert alm_corpus("finalize", str(corpus)) == 0               # rebuilt from the .done.json files
    assert files(corpus) == files(pristine)


def test_manifest_count_too_large_stops_at_the_first_read(corpus):
    path = corpus / "manifest.json"
    path.write_text(_manifest_edit(lambda m: m["shards"][1].update(count=5))(path.read_text()))
    c = Corpus(corpus)
    with pytest.raises(DataError, match=f"{SHARD1}: it holds 4 records, manifest.json says 5") as e:
        c[PER_SHARD]
    assert e.value.kind == "corrupt_shard"


def test_truncated_layout_stops_a_resume(corpus):
    path = corpus / "layout.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(DataError, match="layout.json is damaged") as e:
        write_corpus(corpus, make_record, N, PER_SHARD)
    assert e.value.kind == "bad_layout"


def test_truncated_done_file_rewrites_its_shard_exactly(pristine, corpus):
    path = corpus / f"{SHARD1}.done.json"
    path.write_text(path.read_text()[:30])
    calls = []
    write_corpus(corpus, lambda i: calls.append(i) or make_record(i), N, PER_SHARD)
    assert calls == list(range(PER_SHARD, 2 * PER_SHARD))
    assert files(corpus) == files(pristine)


# --- safetensors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from hf_tiny_llm import save, tiny_hf_llm
    return save(tiny_hf_llm("llama", num_hidden_layers=1), tmp_path_factory.mktemp("llm"))


def _header_flip(data: bytes) -> bytes:
    return _flip(data, 8 + 2)                                    # inside the JSON header


SAFETENSORS_FAULTS = {
    "truncated": lambda b: b[: len(b) // 2],
    "cut_in_header": lambda b: b[:20],
    "empty": lambda b: b"",
    "header_byte_flipped": _header_flip,
}


@pytest.mark.parametrize("fault", [*SAFETENSORS_FAULTS, "index_lists_missing_shard"])
def test_damaged_safetensors_stops_with_one_message(llm_dir, tmp_path, fault, capsys):
    from alm_jax.cli import main
    from alm_jax.weights.inspect import describe_checkpoint
    from alm_jax.weights.llm_params import load_llm
    d = tmp_path / "m"
    shutil.copytree(llm_dir, d)
    f = d / "model.safetensors"
    if fault == "index_lists_missing_shard":
        keys = json.loads(f.read_bytes()[8:8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
        f.rename(d / "model-00001-of-00002.safetensors")
        wm = {k: "model-00001-of-00002.safetensors" for k in keys if k != "__metadata__"}
        wm[next(iter(wm))] = "model-00002-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        text = "model-00002-of-00002.safetensors"
    else:
        f.write_bytes(SAFETENSORS_FAULTS[fault](f.read_bytes()))
        text = "model.safetensors is not a readable safetensors file"
    for load in (load_llm, describe_checkpoint):
        with pytest.raises(WeightImportError, match=text) as e:
            load(d)
        assert "missing" in str(e.value) or "download it again" in str(e.value)
    capsys.readouterr()
    assert main(["info", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alm: error:") and text in err and "Traceback" not in err


def test_flipped_byte_inside_tensor_data_is_not_detectable(llm_dir, tmp_path):
    """The documented limit: safetensors has no checksum, so a flipped data byte loads."""
    from alm_jax.weights.llm_params import load_llm
    d = tmp_path / "m"
    shutil.copytree(llm_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(_flip(f.read_bytes(), f.stat().st_size - 100))
    assert load_llm(d) is not None


# --- FLAC / WAV ----------------------------------------------------------------------------------------

def _tone(sr=8000, n=4000):
    return (0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32)


def _encoded(fmt, samples, sr=8000, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _audio_faults() -> dict[str, tuple[bytes, str]]:
    flac, wav = _encoded("FLAC", _tone()), _encoded("WAV", _tone())
    nan = _tone()
    nan[7] = np.nan
    return {
        "truncated_flac": (flac[: len(flac) // 2], "undecodable"),
        "truncated_wav": (wav[: len(wav) // 2], "undecodable"),
        "garbage": (b"RIFF garbage" * 30, "undecodable"),
        "nan_float_wav": (_encoded("WAV", nan, subtype="FLOAT"), "nonfinite"),
        "empty_wav": (_encoded("WAV", np.zeros(0, np.float32)), "empty"),
        "header_only_flac": (flac[:42], "undecodable"),
    }


def test_bad_audio_files_are_skipped_and_counted_by_the_jsonl_scan(tmp_path):
    faults = _audio_faults()
    lines = []
    sf.write(tmp_path / "good.flac", _tone(), 8000)
    for name, (data, _) in faults.items():
        (tmp_path / f"{name}.audio").write_bytes(data)
        lines += [{"path": "good.flac", "id": f"good-{name}"}, {"path": f"{name}.audio"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = JsonlSource(tmp_path / "m.jsonl")
    items = list(src)
    assert [m.clip_id for m, _ in items] == [f"good-{n}" for n in faults]
    want: dict[str, int] = {}
    for _, kind in faults.values():
        want[kind] = want.get(kind, 0) + 1
    assert dict(src.counter.bad) == want and src.counter.seen == 2 * len(faults)
    assert all(w.samples.shape == (4000, 1) for w in (load() for _, load in items))


def test_bad_audio_bytes_never_enter_a_corpus(tmp_path):
    faults = list(_audio_faults().items())

    def record(i):
        rec = make_record(i)
        if i % 2:
            data, _ = faults[i // 2][1]
            rec.clips = [AudioClip(data, "pcm16", 8000, 0.5)]
        return rec

    write_corpus(tmp_path, record, 2 * len(faults), 4, max_bad_fraction=1.0)
    m = json.loads((tmp_path / "manifest.json").read_text())
    want: dict[str, int] = {}
    for _, (_, kind) in faults:
        want[kind] = want.get(kind, 0) + 1
    assert m["bad_data"]["bad"] == want and m["total_records"] == len(faults)
    assert [r for r in Corpus(tmp_path)] == [make_record(i) for i in range(0, 2 * len(faults), 2)]
