"""The export formats: name -> (module, function). Each exporter is
`export(run: TrainedRun, out: Path, *, dtype: str, max_shard_bytes: int) -> list[str]` (the files written,
relative to `out`), and each module has `unsupported(run) -> str | None`: why this run cannot be written in
that format (None = it can). `check_format` turns a refusal into an error that names the formats that can."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from alm_jax.errors import ConfigError

STAGING = ".partial-export"   # inside --out: where an export is written before its files move into place

FORMATS = {"llm": "alm_jax.export.llm", "peft": "alm_jax.export.peft",
           "qwen2-audio": "alm_jax.export.qwen2_audio", "bundle": "alm_jax.export.bundle"}
DTYPES = ("float32", "bfloat16")


def module(fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])


def supported(run) -> list[str]:
    """The formats that can express `run`'s model."""
    return [f for f in FORMATS if module(f).unsupported(run) is None]


def check_format(run, fmt: str) -> None:
    why = module(fmt).unsupported(run)
    if why is not None:
        raise ConfigError(f"cannot export this run as {fmt!r}: {why}. Formats that can: {', '.join(supported(run))}")


def export(run, fmt: str, out, *, dtype: str = "float32", max_shard_bytes: int = 5 * 10 ** 9, **options) -> list[str]:
    """Writes `run` in format `fmt` into directory `out` (new or empty); returns the files written. `options`:
    the format's own keywords (bundle: copy_base).

    All-or-nothing: the files are written under `out/.partial-export/` and moved into `out` only when the
    format has written all of them, so a killed export leaves no file `out` would be read with; rerunning the
    same command clears the partial files and writes the export again."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {DTYPES}")
    check_format(run, fmt)
    out = Path(out)
    present = sorted(p.name for p in out.iterdir() if p.name != STAGING) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty directory")
    if present:
        raise ConfigError(f"--out {out} already holds {', '.join(present[:4])}{' ...' if len(present) > 4 else ''}; "
                          "give a new or empty directory (an export never mixes its files with others)")
    staging = out / STAGING
    if staging.exists():
        shutil.rmtree(staging)           # what a killed export left behind
    staging.mkdir(parents=True)
    files = module(fmt).export(run, staging, dtype=dtype, max_shard_bytes=max_shard_bytes, **options)
    for entry in sorted(staging.iterdir()):
        entry.replace(out / entry.name)
    staging.rmdir()
    return files
