"""A prepared TFDS dataset directory (ArrayRecord file format) -> `(ClipMeta, loader)`, without TensorFlow.

The directory is the versioned one TFDS writes (`<data_dir>/<name>/<version>/` holding
`dataset_info.json`, `features.json` and `*.array_record-NNNNN-of-NNNNN` shards). It is opened with
`tfds.builder_from_directory(...).as_data_source(split)`. `tfds.features.Audio` cannot be built without
TensorFlow (its constructor calls `tf.dtypes`), so when that fails the same files are read with TFDS'
NumPy example parser after swapping each `Audio` feature for the `Tensor` it is serialized as (eager
audio: an integer array; `lazy_decode=True` audio: the encoded file's bytes).

`TfdsFeatureMap` names which features (nested ones as `"speaker/gender"`) become which `ClipMeta` fields.
The audio feature may hold a waveform (int16-range integers or floats in [-1, 1]) or encoded bytes.
"""

from __future__ import annotations

import copy
import importlib.util
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from alm_jax.audio import io as audio_io
from alm_jax.data.bad_data import BadDataCounter, data_error, error_kind
from alm_jax.data.metadata import ClipMeta, Speech
from alm_jax.errors import AudioError, ConfigError, DataError

Loader = Callable[[], audio_io.Waveform]
_AUDIO_CLASS = "tensorflow_datasets.core.features.audio_feature.Audio"
_TENSOR_CLASS = "tensorflow_datasets.core.features.tensor_feature.Tensor"


@dataclasses.dataclass(frozen=True)
class TfdsFeatureMap:
    """Which dataset features fill which `ClipMeta` fields (None: not present)."""
    audio: str = "audio"
    clip_id: str | None = None
    transcript: str | None = None
    caption: str | None = None
    labels: str | None = None            # ClassLabel (scalar or sequence), text, or list of text
    speaker: Mapping[str, str] = dataclasses.field(default_factory=dict)     # attribute -> feature
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # attribute -> feature
    sample_rate: int | None = None       # required when the audio feature does not record it


@dataclasses.dataclass(frozen=True)
class _ShardInstruction:
    """The FileInstruction protocol ArrayRecordDataSource accepts (no file is opened to count)."""
    filename: str
    skip: int
    take: int
    examples_in_shard: int


class TfdsDirSource:
    """Random access over one split: `source[i] -> (ClipMeta, loader)`; iteration skips bad examples.

    data_dir: the versioned dataset directory. The loader returns a `Waveform` [samples, channels].
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train",
                 mapping: TfdsFeatureMap = TfdsFeatureMap(), *, name: str | None = None,
                 counter: BadDataCounter | None = None,
                 max_seconds: float = audio_io.DEFAULT_MAX_SECONDS):
        self.data_dir = os.fspath(data_dir)
        for f in ("dataset_info.json", "features.json"):
            if not os.path.isfile(os.path.join(self.data_dir, f)):
                raise data_error("missing_file", f"{self.data_dir} is not a prepared TFDS dataset "
                                                 f"directory (no {f}); pass <data_dir>/<name>/<version>")
        self.split, self.mapping, self.max_seconds = split, mapping, max_seconds
        self.counter = counter if counter is not None else BadDataCounter()
        self._source, self._features, self._audio_specs, ds_name = _open(self.data_dir, split)
        self.name = name or ds_name
        self._label_names = self._class_names(mapping.labels)
        spec = self._audio_specs.get(mapping.audio, {})
        rate = mapping.sample_rate or spec.get("sampleRate") or _feature_rate(self._features, mapping.audio)
        self.sample_rate = int(rate) if rate else None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[ClipMeta, Loader]:
        try:
            example = self._source[index]
        except (ValueError, TypeError, KeyError) as e:
            raise data_error("bad_record", f"{self.name}[{index}]: cannot parse example: {e}") from None
        return self._item(index, example)

    def __iter__(self) -> Iterator[tuple[ClipMeta, Loader]]:
        for i in range(len(self)):
            try:
                item = self[i]
            except (AudioError, DataError) as e:
                self.counter.skip(error_kind(e), str(e))
                continue
            self.counter.ok()
            yield item

    def _class_names(self, key: str | None) -> tuple[str, ...]:
        feat = _lookup_feature(self._features, key) if key else None
        inner = getattr(feat, "feature", feat)  # Sequence(ClassLabel) -> ClassLabel
        return tuple(getattr(inner, "names", None) or ())

    def _item(self, index: int, ex: Mapping[str, Any]) -> tuple[ClipMeta, Loader]:
        m = self.mapping
        value = _get(ex, m.audio)
        if isinstance(value, (bytes, np.bytes_)):
            data = bytes(value)
            frames, sr, _ = audio_io.audio_info(data)
            duration = frames / sr
            load: Loader = lambda: _decoded(data, self.max_seconds)  # noqa: E731
        else:
            if not self.sample_rate:
                raise ConfigError(f"{self.name}: the audio feature {m.audio!r} records no sample rate; set "
                                  "TfdsFeatureMap.sample_rate")
            wave = audio_io.Waveform(_to_float(np.asarray(value)), int(self.sample_rate))
            sr, duration = wave.sample_rate, wave.duration
            load = lambda: _checked(wave, self.max_seconds)  # noqa: E731
        if duration == 0:
            raise audio_io.audio_error("empty", f"{self.name}[{index}]: audio has zero samples")
        transcript = _text(_get(ex, m.transcript)) if m.transcript else None
        speaker = {k: _text(_get(ex, f)) for k, f in m.speaker.items()}
        attributes = {k: _text(_get(ex, f)) for k, f in m.attributes.items()}
        speech = (Speech(transcript, 0.0, duration, speaker),) if transcript else ()
        if not transcript:
            attributes.update(speaker)
        meta = ClipMeta(
            clip_id=_text(_get(ex, m.clip_id)) if m.clip_id else f"{self.split}/{index}",
            source=self.name, duration=float(duration), sample_rate=int(sr),
            caption=_text(_get(ex, m.caption)) if m.caption else None,
            labels=self._labels(_get(ex, m.labels)) if m.labels else (),
            speech=speech, attributes=attributes, label_vocabulary=self._label_names)
        return meta, load

    def _labels(self, value: Any) -> tuple[str, ...]:
        values = np.atleast_1d(np.asarray(value, dtype=object) if not isinstance(value, list) else value)
        out = []
        for v in values:
            if isinstance(v, (bytes, np.bytes_, str)):
                out.append(_text(v))
            else:
                i = int(v)
                out.append(self._label_names[i] if i < len(self._label_names) else str(i))
        return tuple(out)


def _open(data_dir: str, split: str):
    """(data source, features, {audio feature path: Audio json spec}, dataset name)."""
    import tensorflow_datasets as tfds

    with open(os.path.join(data_dir, "features.json")) as f:
        needs_tf = _AUDIO_CLASS in f.read() and importlib.util.find_spec("tensorflow") is None
    if needs_tf:
        return _open_without_tf(data_dir, split)
    try:
        builder = tfds.builder_from_directory(data_dir)
        if split not in builder.info.splits:
            raise data_error("missing_split", f"{data_dir} has no split {split!r}; it has "
                                              f"{sorted(builder.info.splits)}")
        return builder.as_data_source(split=split), builder.info.features, {}, builder.name
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
    return _open_without_tf(data_dir, split)


def _open_without_tf(data_dir: str, split: str):
    import grain
    import tensorflow_datasets as tfds

    with open(os.path.join(data_dir, "features.json")) as f:
        features_json = json.load(f)
    with open(os.path.join(data_dir, "dataset_info.json")) as f:
        info = json.load(f)
    audio_specs: dict[str, dict[str, Any]] = {}
    features_json = _swap_audio(features_json, "", audio_specs)
    features = tfds.features.FeatureConnector.from_json(features_json)
    features.load_metadata(data_dir)
    if info.get("fileFormat", "tfrecord") != "array_record":
        raise data_error("bad_format", f"{data_dir} is stored as {info.get('fileFormat', 'tfrecord')}; "
                                       "only the array_record file format can be read without TensorFlow")
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
        raise data_error("missing_split", f"{data_dir} has no split {split!r}; it has {sorted(splits)}")
    lengths = [int(n) for n in splits[split].get("shardLengths", [])]
    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=data_dir, template=splits[split].get("filepathTemplate") or
        tfds.core.naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=info["name"], split=split,
        filetype_suffix="array_record")
    paths = template.sharded_filepaths(len(lengths))
    instructions = [_ShardInstruction(os.fspath(p), 0, n, n) for p, n in zip(paths, lengths) if n]
    raw = grain.sources.ArrayRecordDataSource(instructions)
    return _Decoded(raw, features), features, audio_specs, info["name"]


def _swap_audio(node: Any, path: str, specs: dict[str, dict[str, Any]]) -> Any:
    """Copy of a features.json tree with every Audio feature replaced by its serialized Tensor form."""
    if isinstance(node, dict):
        if node.get("pythonClassName") == _AUDIO_CLASS:
            spec = node.get("audio", {})
            specs[path] = spec
            if spec.get("lazyDecode"):
                tensor = {"dtype": "string", "encoding": "none", "shape": {}}
            else:
                tensor = {"dtype": spec.get("dtype", "int64"), "encoding": spec.get("encoding", "none").lower(),
                          "shape": copy.deepcopy(spec.get("shape", {"dimensions": ["-1"]}))}
            return {"pythonClassName": _TENSOR_CLASS, "tensor": tensor}
        out = {}
        for k, v in node.items():
            if k == "featuresDict" and isinstance(v, dict) and isinstance(v.get("features"), dict):
                out[k] = {**v, "features": {fk: _swap_audio(fv, f"{path}/{fk}".lstrip("/"), specs)
                                            for fk, fv in v["features"].items()}}
            else:
                out[k] = _swap_audio(v, path, specs)
        return out
    return node


class _Decoded:
    """Raw ArrayRecord bytes -> decoded NumPy example dicts."""

    def __init__(self, raw, features):
        self._raw, self._features = raw, features

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._features.deserialize_example_np(self._raw[i])


def _lookup_feature(features, key: str):
    feat = features
    for part in key.split("/"):
        feat = feat[part]
    return feat


def _feature_rate(features, key: str) -> int | None:
    try:
        return getattr(_lookup_feature(features, key), "sample_rate", None)
    except (KeyError, TypeError):
        return None


def _get(example: Mapping[str, Any], key: str) -> Any:
    value: Any = example
    for part in key.split("/"):
        try:
            value = value[part]
        except (KeyError, TypeError):
            raise ConfigError(f"feature {key!r} is not in the dataset (mapping in TfdsFeatureMap); "
                              f"top-level features: {sorted(example)}") from None
    return value


def _text(v: Any) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item())
    return str(v)


def _to_float(a: np.ndarray) -> np.ndarray:
    """Integer PCM (int16 range; int32 full range) or float samples -> float32 [samples, channels]."""
    if a.dtype == np.int32:
        a = a.astype(np.float32) / 2.0 ** 31
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / 32768.0
    else:
        a = a.astype(np.float32, copy=False)
    return a.reshape(a.shape[0], -1)


def _checked(wave: audio_io.Waveform, max_seconds: float) -> audio_io.Waveform:
    audio_io.validate_audio(wave.samples, wave.sample_rate, max_seconds=max_seconds)
    return wave


def _decoded(data: bytes, max_seconds: float) -> audio_io.Waveform:
    sr = audio_io.audio_info(data)[1]
    return audio_io.Waveform(audio_io.decode_audio(data, mono=False, max_seconds=max_seconds), sr)
