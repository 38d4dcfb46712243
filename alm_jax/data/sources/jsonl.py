"""A JSONL manifest of local audio files -> `(ClipMeta, loader)` pairs; audio is read only by `loader()`.

One JSON object per line:

    {"path": "spk1/utt3.flac",            # required, relative to the declared root
     "id": "utt3",                         # optional (default: path, plus the span if cropped)
     "start": 1.5, "end": 4.0,             # optional span in seconds
     "transcript": "hello there",          # optional; one speech segment over the clip
     "speaker": {"gender": "female", "age": "adult", "accent": "scottish", "emotion": "happy"},
     "segments": [{"transcript": "...", "start": 0.0, "end": 1.2, "speaker": {...}}],  # optional
     "caption": "a dog barks twice", "labels": ["dog"], "label_vocabulary": ["dog", "cat", ...],
     "events": [{"label": "dog", "onset": 0.2, "offset": 0.9}],
     "attributes": {"snr": "high"},        # clip-level attributes
     ...}                                  # anything else goes to ClipMeta.extra

Times inside the clip (segments, events) are relative to `start`. An absolute path, a `..` component,
or a symlink that leaves the root is refused (`DataError`, kind `path_traversal`). A line that is not
UTF-8 / not JSON / lacks `path`, or whose file is missing or has no readable header, is skipped and
counted in the `BadDataCounter`. The scan also decodes each line's audio span (`check_audio`, default
on): a file that is truncated or garbage (`undecodable`), holds NaN/inf (`nonfinite`), is empty or too
long is skipped and counted by that kind, so it never reaches a corpus.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Iterator, Sequence

import soundfile as sf

from alm_jax.audio import io as audio_io
from alm_jax.data.bad_data import BadDataCounter, data_error, error_kind
from alm_jax.errors import AudioError, DataError
from alm_jax.data.metadata import ClipMeta, Event, Speech

Loader = Callable[[], audio_io.Waveform]
_KNOWN = {"path", "id", "start", "end", "transcript", "speaker", "segments", "caption", "labels",
          "label_vocabulary", "events", "attributes", "duration", "sample_rate"}


def resolve_under_root(root: str, rel: str) -> str:
    """The real path of `rel` inside `root`; `DataError` kind `path_traversal` if it would leave root."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise data_error("bad_manifest", f"manifest path must be a non-empty string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise data_error("path_traversal", f"manifest path {rel!r} is absolute; paths must be relative "
                                           f"to the manifest root {root}")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise data_error("path_traversal", f"manifest path {rel!r} contains '..'; paths must stay "
                                           f"inside the manifest root {root}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise data_error("path_traversal", f"manifest path {rel!r} resolves to {real}, outside the "
                                           f"manifest root {real_root} (a symlink escapes the root)")
    return real


class JsonlSource:
    """Iterate a JSONL manifest as `(ClipMeta, loader)`; `loader()` returns a `Waveform` [samples, ch].

    root: directory the manifest paths are relative to (default: the manifest's directory).
    label_vocabulary: the source-wide label set (a line's own `label_vocabulary` wins); `"auto"` scans
      the manifest once for the union of all labels.
    counter: receives the skipped lines by kind (a fresh one by default; see `self.counter`).
    check_audio: decode every span during the scan (see the module doc); False reads only headers, and a
      bad file then fails when its loader runs.
    """

    def __init__(self, manifest: str | os.PathLike, root: str | os.PathLike | None = None, *,
                 name: str | None = None, label_vocabulary: Sequence[str] | str = (),
                 counter: BadDataCounter | None = None,
                 max_seconds: float = audio_io.DEFAULT_MAX_SECONDS, check_audio: bool = True):
        self.manifest = os.fspath(manifest)
        self.root = os.path.realpath(root if root is not None else os.path.dirname(self.manifest) or ".")
        if not os.path.isdir(self.root):
            raise data_error("missing_file", f"manifest root {self.root} is not a directory")
        self.name = name or os.path.splitext(os.path.basename(self.manifest))[0]
        self.counter = counter if counter is not None else BadDataCounter()
        self.max_seconds, self.check_audio = max_seconds, check_audio
        if label_vocabulary == "auto":
            label_vocabulary = self._collect_labels()
        self.label_vocabulary = tuple(label_vocabulary)

    def __iter__(self) -> Iterator[tuple[ClipMeta, Loader]]:
        for lineno, line in self._lines():
            try:
                item = self._parse(lineno, line)
            except (AudioError, DataError) as e:
                if getattr(e, "kind", None) == "path_traversal":
                    raise
                self.counter.skip(error_kind(e), str(e))
                continue
            self.counter.ok()
            yield item

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        if not os.path.isfile(self.manifest):
            raise data_error("missing_file", f"manifest not found: {self.manifest}")
        with open(self.manifest, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line

    def _where(self, lineno: int) -> str:
        return f"{self.manifest}:{lineno}"

    def _decode_line(self, lineno: int, line: bytes) -> dict[str, Any]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise data_error("bad_utf8", f"{self._where(lineno)}: line is not UTF-8: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise data_error("bad_json", f"{self._where(lineno)}: line is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise data_error("bad_json", f"{self._where(lineno)}: line must be a JSON object")
        return d

    def _collect_labels(self) -> list[str]:
        labels: set[str] = set()
        for lineno, line in self._lines():
            try:
                labels.update(self._decode_line(lineno, line).get("labels") or ())
            except Exception:  # noqa: BLE001 - bad lines are counted when iterated
                continue
        return sorted(labels)

    def _parse(self, lineno: int, line: bytes) -> tuple[ClipMeta, Loader]:
        d = self._decode_line(lineno, line)
        if "path" not in d:
            raise data_error("bad_manifest", f"{self._where(lineno)}: line has no 'path'")
        path = resolve_under_root(self.root, d["path"])
        if not os.path.isfile(path):
            raise audio_io.audio_error("missing_file", f"{self._where(lineno)}: audio file not found: {path}")
        try:
            info = sf.info(path)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise audio_io.audio_error("undecodable",
                                       f"{self._where(lineno)}: cannot read {path}: {e}") from None
        if info.frames == 0:
            raise audio_io.audio_error("empty", f"{self._where(lineno)}: {path} has zero samples")
        try:
            meta = self._meta(d, info.duration, info.samplerate)
        except (TypeError, ValueError, KeyError) as e:
            raise data_error("bad_manifest", f"{self._where(lineno)}: bad field: {e}") from None
        if meta.duration > self.max_seconds:
            raise audio_io.audio_error(
                "too_long", f"{self._where(lineno)}: {path} span lasts {meta.duration:.1f} s, above "
                            f"max_seconds={self.max_seconds:g}")
        loader = functools.partial(audio_io.read_audio_file, path, start=d.get("start"), end=d.get("end"),
                                   max_seconds=self.max_seconds)
        if self.check_audio:
            try:
                loader()
            except AudioError as e:
                raise audio_io.audio_error(getattr(e, "kind", None) or "undecodable",
                                           f"{self._where(lineno)}: {e}") from None
        return meta, loader

    def _meta(self, d: dict[str, Any], file_duration: float, sr: int) -> ClipMeta:
        start = float(d.get("start") or 0.0)
        end = min(float(d["end"]), file_duration) if d.get("end") is not None else file_duration
        if end <= start:
            raise ValueError(f"span start={start} end={end} is empty (file lasts {file_duration:.2f} s)")
        duration = end - start
        speech = []
        if d.get("transcript") is not None:
            speech.append(Speech(str(d["transcript"]), 0.0, duration, dict(d.get("speaker") or {})))
        for s in d.get("segments") or ():
            speech.append(Speech(str(s["transcript"]), float(s["start"]), float(s["end"]),
                                 dict(s.get("speaker") or {})))
        attributes = dict(d.get("attributes") or {})
        if d.get("speaker") and d.get("transcript") is None:
            attributes.update(d["speaker"])
        clip_id = d.get("id") or (d["path"] if "start" not in d and "end" not in d
                                  else f"{d['path']}@{start:.3f}-{end:.3f}")
        return ClipMeta(
            clip_id=str(clip_id), source=self.name, duration=duration, sample_rate=int(sr),
            caption=d.get("caption"), labels=tuple(d.get("labels") or ()),
            events=tuple(Event(str(e["label"]), float(e["onset"]), float(e["offset"]))
                         for e in d.get("events") or ()),
            speech=tuple(speech), attributes=attributes,
            label_vocabulary=tuple(d.get("label_vocabulary") or self.label_vocabulary),
            extra={k: v for k, v in d.items() if k not in _KNOWN})
