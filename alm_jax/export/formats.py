"""The export formats: name -> (module, function). Each exporter is
`export(run: TrainedRun, out: Path, *, dtype: str, max_shard_bytes: int) -> list[str]` (the files written,
relative to `out`), and each module has `unsupported(run) -> str | None`: why this run cannot be written in
that format (None = it can). `check_format` turns a refusal into an error that names the formats that can."""

from __future__ import annotations

import importlib

from alm_jax.errors import ConfigError

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
    """Writes `run` in format `fmt` into directory `out`; returns the files written. `options`: the format's own
    keywords (bundle: copy_base)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {DTYPES}")
    check_format(run, fmt)
    return module(fmt).export(run, out, dtype=dtype, max_shard_bytes=max_shard_bytes, **options)
