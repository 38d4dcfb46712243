"""Sources: JSONL manifest (fields, bad lines counted, path traversal refused) and a TFDS directory
read without TensorFlow (plain features and the Audio feature)."""

import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

from alm_jax.audio import io as aio
from alm_jax.data.bad_data import BadDataCounter
from alm_jax.data.sources.jsonl import JsonlSource
from alm_jax.errors import AudioError, DataError


def _tone(sr=16000, seconds=1.0, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_manifest(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


@pytest.fixture
def audio_root(tmp_path):
    root = tmp_path / "audio"
    (root / "spk1").mkdir(parents=True)
    sf.write(root / "spk1" / "a.flac", _tone(16000, 2.0), 16000)
    sf.write(root / "b.wav", np.stack([_tone(8000, 1.0), _tone(8000, 1.0, 300)], 1), 8000)
    data = aio.encode_audio(_tone(16000, 2.0), 16000)
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    (root / "garbage.wav").write_bytes(b"not audio" * 50)
    nan = _tone(8000, 0.5)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 8000, subtype="FLOAT")
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 8000)
    sf.write(root / "long.flac", np.zeros(8000 * 4, np.float32), 8000)
    return root


def test_jsonl_fields_and_lazy_audio(tmp_path, audio_root):
    manifest = tmp_path / "m.jsonl"
    _write_manifest(manifest, [
        {"path": "spk1/a.flac", "id": "utt-a", "start": 0.5, "end": 1.5, "transcript": "hello world",
         "speaker": {"gender": "female", "accent": "scottish", "emotion": "happy"}, "language": "en"},
        {"path": "b.wav", "caption": "two tones", "labels": ["tone"], "attributes": {"snr": "high"},
         "events": [{"label": "tone", "onset": 0.0, "offset": 1.0}]},
        {"path": "spk1/a.flac", "labels": ["speech"], "speaker": {"gender": "male"}},
    ])
    src = JsonlSource(manifest, root=audio_root, name="mine", label_vocabulary="auto")
    items = list(src)
    assert src.counter.seen == 3 and src.counter.total_bad == 0
    (m0, load0), (m1, load1), (m2, _) = items
    assert (m0.clip_id, m0.source, m0.sample_rate, m0.duration) == ("utt-a", "mine", 16000, 1.0)
    assert m0.transcript == "hello world"
    assert m0.speech[0].attributes == {"gender": "female", "accent": "scottish", "emotion": "happy"}
    assert m0.extra == {"language": "en"}
    assert m0.label_vocabulary == ("speech", "tone")
    w = load0()
    assert w.sample_rate == 16000 and w.samples.shape == (16000, 1)
    np.testing.assert_allclose(w.samples[:, 0], _tone(16000, 2.0)[8000:24000], atol=1 / 32768)
    assert (m1.caption, m1.labels, m1.attributes) == ("two tones", ("tone",), {"snr": "high"})
    assert m1.events[0].label == "tone"
    assert m1.clip_id == "b.wav" and load1().samples.shape == (8000, 2)
    # No transcript: the speaker attributes are clip-level.
    assert m2.attributes == {"gender": "male"} and m2.speech == ()


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path, audio_root):
    manifest = tmp_path / "m.jsonl"
    _write_manifest(manifest, [
        {"path": "spk1/a.flac"},
        b'{"path": "b.wav", ',                      # bad JSON
        b'{"path": "b\xff\xfe.wav"}',               # bad UTF-8
        b"[1, 2]",                                  # JSON but not an object
        {"caption": "no path"},                     # no path
        {"path": "missing.flac"},                   # missing file
        {"path": "garbage.wav"},                    # header unreadable
        {"path": "b.wav", "start": 5.0},            # empty span
        {"path": "empty.wav"},                      # zero samples
        {"path": "long.flac"},                      # 4 s > max_seconds
        {"path": "long.flac", "end": 2.0},          # ... a 2 s span of it is fine
        {"path": "truncated.flac"},                 # header is fine: the scan decodes it
        {"path": "nan.wav"},                        # header is fine: the scan finds the NaN
    ])
    src = JsonlSource(manifest, root=audio_root, max_seconds=3.0)
    items = list(src)
    assert [m.clip_id for m, _ in items] == ["spk1/a.flac", "long.flac@0.000-2.000"]
    assert dict(src.counter.bad) == {"bad_json": 2, "bad_utf8": 1, "bad_manifest": 2, "missing_file": 1,
                                     "undecodable": 2, "empty": 1, "too_long": 1, "nonfinite": 1}
    assert src.counter.seen == 13
    assert any("m.jsonl:12" in x and "truncated.flac" in x for x in src.counter.examples["undecodable"])
    # Without the scan's decode (check_audio=False), audio errors surface when the loader runs; the
    # consumer counts them with the same counter.
    src = JsonlSource(manifest, root=audio_root, max_seconds=3.0, check_audio=False)
    items = list(src)
    assert [m.clip_id for m, _ in items] == ["spk1/a.flac", "long.flac@0.000-2.000", "truncated.flac", "nan.wav"]
    loaded = BadDataCounter()
    waves = [loaded.call(load) for _, load in items]
    assert [w is None for w in waves] == [False, False, True, True]
    assert waves[1].samples.shape == (16000, 1)
    assert dict(loaded.bad) == {"undecodable": 1, "nonfinite": 1}
    with pytest.raises(AudioError) as e:
        items[2][1]()
    assert e.value.kind == "undecodable"


@pytest.mark.parametrize("path", ["../outside.wav", "spk1/../../outside.wav", "/etc/passwd", "link/outside.wav",
                                  "escape.wav"])
def test_jsonl_path_traversal_is_refused(tmp_path, audio_root, path):
    outside = tmp_path / "secret"
    outside.mkdir()
    sf.write(outside / "outside.wav", _tone(), 16000)
    os.symlink(outside, audio_root / "link")
    os.symlink(outside / "outside.wav", audio_root / "escape.wav")
    manifest = tmp_path / "m.jsonl"
    _write_manifest(manifest, [{"path": "spk1/a.flac"}, {"path": path}])
    with pytest.raises(DataError) as e:
        list(JsonlSource(manifest, root=audio_root))
    assert e.value.kind == "path_traversal"


def test_jsonl_symlink_inside_root_is_allowed(tmp_path, audio_root):
    os.symlink(audio_root / "spk1", audio_root / "alias")
    manifest = tmp_path / "m.jsonl"
    _write_manifest(manifest, [{"path": "alias/a.flac"}])
    assert len(list(JsonlSource(manifest, root=audio_root))) == 1


# --- TFDS directory ----------------------------------------------------------------------------------

def _build_tfds(data_dir, n=4, audio_feature="waveform"):
    """A tiny TFDS dataset in ArrayRecord format, written without TensorFlow."""
    import tensorflow_datasets as tfds

    audio = (tfds.features.Tensor(shape=(None,), dtype=np.int16) if audio_feature == "waveform"
             else tfds.features.Tensor(shape=(), dtype=np.object_))

    class TinySpeech(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "speech": audio,
                "text": tfds.features.Text(),
                "id": tfds.features.Text(),
                "speaker": {"gender": tfds.features.Text(), "age": tfds.features.Text()},
                "label": tfds.features.ClassLabel(names=["neutral", "happy", "sad"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(n)}

        def _generate_examples(self, n):
            for i in range(n):
                wave = np.round(_tone(16000, 0.25 * (i + 1), 200 * (i + 1)) * 32767).astype(np.int16)
                value = wave if audio_feature == "waveform" else aio.encode_audio(wave / 32768.0, 16000)
                yield str(i), {"speech": value, "text": f"utterance {i}", "id": f"u{i}",
                               "speaker": {"gender": "female" if i % 2 else "male", "age": "adult"},
                               "label": i % 3}

    builder = TinySpeech(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def _mapping(**kw):
    from alm_jax.data.sources.tfds_dir import TfdsFeatureMap

    return TfdsFeatureMap(audio="speech", clip_id="id", transcript="text", labels="label",
                          speaker={"gender": "speaker/gender", "age": "speaker/age"}, **kw)


def _check_tfds(src):
    assert len(src) == 4 and src.sample_rate in (16000, None)
    items = list(src)
    assert src.counter.seen == 4 and src.counter.total_bad == 0
    assert sorted(m.clip_id for m, _ in items) == ["u0", "u1", "u2", "u3"]  # TFDS shuffles by key
    for meta, load in items:
        i = int(meta.clip_id[1:])
        assert meta.source == "tiny_speech"
        assert meta.transcript == f"utterance {i}" and meta.duration == pytest.approx(0.25 * (i + 1))
        assert meta.speech[0].attributes == {"gender": "female" if i % 2 else "male", "age": "adult"}
        assert meta.labels == (["neutral", "happy", "sad"][i % 3],)
        assert meta.label_vocabulary == ("neutral", "happy", "sad")
        w = load()
        assert w.sample_rate == 16000 and w.samples.shape == (4000 * (i + 1), 1)
        np.testing.assert_allclose(w.samples[:, 0], _tone(16000, 0.25 * (i + 1), 200 * (i + 1)), atol=2 / 32768)


def test_tfds_dir_plain_features(tmp_path):
    from alm_jax.data.sources.tfds_dir import TfdsDirSource

    data_dir = _build_tfds(tmp_path / "tfds")
    _check_tfds(TfdsDirSource(data_dir, "train", _mapping(sample_rate=16000)))
    data_dir = _build_tfds(tmp_path / "tfds_bytes", audio_feature="flac")
    _check_tfds(TfdsDirSource(data_dir, "train", _mapping()))
    assert "tensorflow" not in sys.modules
    with pytest.raises(DataError, match="no split 'test'"):
        TfdsDirSource(data_dir, "test", _mapping())


@pytest.mark.parametrize("lazy", [False, True])
def test_tfds_dir_audio_feature_without_tensorflow(tmp_path, lazy):
    """`tfds.features.Audio` needs TF to be constructed; the source falls back to reading the same
    ArrayRecord files with TFDS' NumPy parser. Audio serializes exactly like the Tensor written here
    (eager: the int array; lazy_decode: the encoded bytes), so the features.json is rewritten to the
    Audio spec TFDS itself writes."""
    from alm_jax.data.sources.tfds_dir import TfdsDirSource

    data_dir = _build_tfds(tmp_path / "tfds", audio_feature="flac" if lazy else "waveform")
    path = os.path.join(data_dir, "features.json")
    with open(path) as f:
        features = json.load(f)
    features["featuresDict"]["features"]["speech"] = {
        "pythonClassName": "tensorflow_datasets.core.features.audio_feature.Audio",
        "audio": {"shape": {"dimensions": ["-1"]}, "dtype": "int16", "sampleRate": "16000",
                  "encoding": "none", **({"fileFormat": "flac", "lazyDecode": True} if lazy else {})}}
    with open(path, "w") as f:
        json.dump(features, f)
    _check_tfds(TfdsDirSource(data_dir, "train", _mapping()))
    assert "tensorflow" not in sys.modules
