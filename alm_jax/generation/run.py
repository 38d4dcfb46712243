"""`alm generate`: a recipe + a source + the backbone LLM -> a self-generated corpus, with progress and a report.

    alm generate --recipe desta --source demo --llm demo:smollm2-135m-instruct --out corpora/desta --n 1000 \
        sampling.temperature=0.7 recipe.some_option=... source.seed=3

`--source`: `demo` (the built-in synthetic source, `source.*` options go to `DemoSource`), a JSONL manifest
(`*.jsonl`, `data/sources/jsonl.py`), or a prepared TFDS directory. Overrides `recipe.K=V`,
`source.K=V` and `sampling.K=V` (values parsed as YAML) go to the recipe, the source and
`generation.sampler.SamplingConfig`.

Resumable: finished shards are skipped, a killed run loses at most the shard in flight and never writes a
duplicate (`data/corpus.py`). The corpus records the settings that produce its records (`cli_settings`:
recipe and options, seed, source and options, LLM name, backend, sampling, token limits, stop strings,
drop_unfinished) and the command that continues it; a rerun with other settings (or another --n /
--records-per-shard) stops before loading anything, saying what differs, to pass another --out for a new
corpus, and the command that continues the old one.

Multi-process (`jax.distributed`, e.g. `launch/local_multihost.sh`): process p writes shards p, p + P, ...;
the bytes of a shard do not depend on the process count (sampling randomness is keyed by item index), and
process 0 writes the manifest and the report once all shards exist. The generator LLM is placed on a mesh over this process's devices (`--fsdp`, `--tensor`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from alm_jax.errors import ConfigError

PREFIXES = ("recipe", "source", "sampling")


def parse_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`["recipe.k=v", "sampling.temperature=0.7"]` -> `{"recipe": {"k": v}, "sampling": {...}, "source": {}}`."""
    out: dict[str, dict[str, Any]] = {p: {} for p in PREFIXES}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        prefix, dot, name = key.partition(".")
        if not eq or not dot or prefix not in out or not name:
            raise ConfigError(f"override {pair!r}: write {'|'.join(PREFIXES)}.KEY=VALUE, e.g. sampling.temperature=0.7")
        out[prefix][name] = yaml.safe_load(value)
    return out


def _quote(value: Any) -> str:
    import shlex
    return shlex.quote(str(value))


def resume_command(args, over: dict[str, dict[str, Any]]) -> str:
    """The `alm generate` command line that continues the corpus of `args` (what `cli_settings` records;
    without --batch-size and the parallelism flags, which do not change the records)."""
    import json
    parts = ["alm generate", "--recipe", args.recipe, "--source", args.source, "--llm", args.llm,
             "--n", args.n, "--records-per-shard", args.records_per_shard, "--max-new-tokens", args.max_new_tokens,
             "--max-prompt-tokens", args.max_prompt_tokens, "--seed", args.seed]
    if args.backend != "native":
        parts += ["--backend", args.backend] + (["--model", args.model] if args.model else [])
    for stop in args.stop:
        parts += ["--stop", stop]
    if args.drop_unfinished:
        parts.append("--drop-unfinished")
    if args.trim_unfinished:
        parts.append("--trim-unfinished")
    parts += [f"{prefix}.{k}={json.dumps(v)}" for prefix in PREFIXES for k, v in sorted(over[prefix].items())]
    parts += ["--out", args.out]
    return " ".join(p if p == "alm generate" else _quote(p) for p in parts)


def cli_settings(args, over: dict[str, dict[str, Any]], sampling) -> dict[str, Any]:
    """What `alm generate` records as the settings of a corpus (compared on every rerun)."""
    llm = args.model if args.backend == "openai" and args.model else Path(args.llm_dir).resolve().name
    return {"recipe": args.recipe, "recipe_options": over["recipe"], "seed": args.seed,
            "source": args.source if args.source == "demo" else Path(args.source).name,
            "source_options": over["source"], "llm": llm, "backend": args.backend,
            "sampling": dataclasses.asdict(sampling), "max_new_tokens": args.max_new_tokens,
            "max_prompt_tokens": args.max_prompt_tokens, "stop": list(args.stop),
            "drop_unfinished": bool(args.drop_unfinished),
            **({"trim_unfinished": True} if args.trim_unfinished else {})}   # absent when off: older corpora match


def check_out_dir(args, settings: dict[str, Any]) -> None:
    """Stop (`DataError`) before any work when --out holds a corpus of other settings or layout."""
    from alm_jax.data.bad_data import data_error
    from alm_jax.data.corpus import check_resume
    from alm_jax.errors import DataError
    try:
        check_resume(args.out, args.n, args.records_per_shard, settings)
    except DataError as e:
        if getattr(e, "kind", None) not in ("settings_mismatch", "layout_mismatch"):
            raise
        recorded = e.recorded
        old = recorded.get("command") or f"the settings recorded in {Path(args.out) / 'layout.json'}"
        raise data_error(e.kind, f"--out {args.out} holds a corpus generated with other settings ("
                                 f"{'; '.join(e.differences)}); a corpus never mixes the records of two settings. "
                                 "To start a new corpus with this run's settings, pass another --out; to continue "
                                 f"this one, rerun with its settings:\n  {old}") from None


def build_source(spec: str, n: int, options: dict[str, Any]):
    """`demo` | a JSONL manifest | a TFDS dataset directory -> a random-access source of `(meta, wave)`."""
    if spec == "demo":
        from alm_jax.data.sources.demo import DemoSource
        return DemoSource(n_clips=n, **options)
    path = Path(spec)
    from alm_jax.data.sources.random_access import RandomAccessWaveforms
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        from alm_jax.data.sources.jsonl import JsonlSource
        return RandomAccessWaveforms(JsonlSource(path, **options))
    if path.is_dir():
        from alm_jax.data.sources.tfds_dir import TfdsDirSource
        return RandomAccessWaveforms(TfdsDirSource(path, **options))
    raise ConfigError(f"--source {spec!r}: give `demo`, a JSONL manifest (*.jsonl) or a prepared TFDS dataset "
                      "directory (<data_dir>/<name>/<version>)")


class Progress:
    """One line per finished shard (on a TTY, rewritten in place): shards, samples/s, tokens/s, ETA."""

    def __init__(self, total_shards: int, done_shards: int, stream=None):
        stream = stream if stream is not None else sys.stderr   # looked up now: sys.stderr may be replaced
        self.total, self.done, self.stream = total_shards, done_shards, stream
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0
        self.tty = stream.isatty()

    def __call__(self, stats: dict) -> None:
        self.done += 1
        self.samples += stats["responses"]
        self.tokens += stats["tokens"]
        wall = time.perf_counter() - self.t0
        rate = self.samples / wall if wall else 0.0
        per_shard = wall / max(self.done - self._start_done, 1)
        eta = per_shard * (self.total - self.done)
        line = (f"[alm generate] shard {self.done}/{self.total}  {rate:.2f} samples/s  "
                f"{self.tokens / wall if wall else 0.0:.1f} tokens/s  ETA {eta / 60:.1f} min  "
                f"(last shard: {stats['responses']} answers, filtered {stats['filtered'] or 0})")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def start(self) -> "Progress":
        self._start_done = self.done
        return self


def run_generate(args) -> dict:
    """The `alm generate` command (see the module doc); returns the report (process 0) or its shard stats."""
    import jax

    from alm_jax.data.corpus import finalize_manifest, shard_name
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus, generation_report
    from alm_jax.generation.sampler import SamplingConfig
    from alm_jax.recipes import build_recipe
    from alm_jax.sharding import make_mesh
    from alm_jax.distributed import initialize_distributed
    from alm_jax.weights.demo_models import resolve_model_path

    initialize_distributed(args.distributed)
    over = parse_overrides(args.overrides)
    llm = resolve_model_path(args.llm)
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, **over["sampling"])
    except TypeError as e:
        raise ConfigError(f"sampling.* overrides: {e}; fields: "
                          f"{[f.name for f in dataclasses.fields(SamplingConfig)]}") from e
    args.llm_dir = llm
    settings, command = cli_settings(args, over, sampling), resume_command(args, over)
    check_out_dir(args, settings)
    source = build_source(args.source, args.n, over["source"])
    if len(source) < args.n:
        raise ConfigError(f"--n {args.n} but the source has {len(source)} clips; lower --n")
    recipe = build_recipe(args.recipe, args.seed, **over["recipe"])
    mesh = make_mesh(-1, args.fsdp, args.tensor, devices=jax.local_devices()) \
        if args.backend == "native" and (args.fsdp * args.tensor > 1 or len(jax.local_devices()) > 1) else None
    if args.backend == "openai":
        from alm_jax.generation.openai_backend import OpenAIGenerator
        if not args.base_url:
            raise ConfigError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        generator = OpenAIGenerator(args.base_url, model=args.model, tokenizer_dir=llm, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                    sampling=sampling, stop_strings=tuple(args.stop))
    else:
        generator = ResponseGenerator(llm, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      max_prompt_tokens=args.max_prompt_tokens, sampling=sampling,
                                      stop_strings=tuple(args.stop), mesh=mesh)
    pi, pc = jax.process_index(), jax.process_count()
    num_shards = -(-args.n // args.records_per_shard)
    mine = range(pi, num_shards, pc)
    done = sum((Path(args.out) / f"{shard_name(s, num_shards)}.done.json").exists() for s in mine)
    progress = Progress(len(mine), done).start()
    stats = generate_corpus(args.out, source, recipe, generator, n_records=args.n,
                            records_per_shard=args.records_per_shard, process_index=pi, process_count=pc,
                            drop_unfinished=args.drop_unfinished, trim_unfinished=args.trim_unfinished,
                            on_shard=progress, finalize=False,
                            settings=settings, resume_command=command)
    if progress.tty:
        sys.stderr.write("\n")
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("alm generate: all shards written")
    if pi != 0:
        return {"shards": stats}
    finalize_manifest(args.out)
    return generation_report(args.out)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="write a self-generated corpus: a recipe's prompts answered by the LLM")
    g.add_argument("--recipe", required=True, help="desta | balsa | balsa_ma | alarm | mallm | mats")
    g.add_argument("--source", required=True, help="demo | MANIFEST.jsonl | TFDS_DATASET_DIR")
    g.add_argument("--llm", required=True, help="backbone LLM: a local HF directory or demo:smollm2-135m-instruct "
                   "(with --backend openai: its tokenizer, for prompt lengths)")
    g.add_argument("--backend", default="native", choices=["native", "openai"],
                   help="native: our JAX sampler; openai: an OpenAI-compatible server (vLLM, SGLang, alm serve)")
    g.add_argument("--base-url", default=None, help="with --backend openai: e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, help="with --backend openai: the served model name (default: the first)")
    g.add_argument("--out", required=True, help="corpus directory (resumed if it exists)")
    g.add_argument("--n", type=int, default=1000, help="records to generate (items 0..n-1 of the source)")
    g.add_argument("--records-per-shard", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-prompt-tokens", type=int, default=1024)
    g.add_argument("--seed", type=int, default=0, help="recipe draws and sampling randomness")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--drop-unfinished", action="store_true", help="drop answers cut off at --max-new-tokens")
    g.add_argument("--trim-unfinished", action="store_true",
                   help="cut an answer cut off at --max-new-tokens back to its last whole sentence (dropped as "
                        "'unfinished' when it has none), so no target ends mid-sentence")
    g.add_argument("--fsdp", type=int, default=1, help="shard the LLM's parameters over this many local devices")
    g.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree over local devices")
    g.add_argument("--distributed", default="auto", choices=["auto", "off", "explicit"])
    g.add_argument("overrides", nargs="*", help="recipe.K=V source.K=V sampling.K=V")
    g.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import json
    report = run_generate(args)
    if "records_kept" in report:
        print(json.dumps({k: report[k] for k in ("records_kept", "filtered", "bad")}))
        print(f"corpus: {os.path.abspath(args.out)} (report: generation_report.json)")
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve an LLM with our sampler on an OpenAI-compatible endpoint (loopback)")
    s.add_argument("--llm", required=True, help="a local HF directory or demo:smollm2-135m-instruct")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--max-prompt-tokens", type=int, default=1024)
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    from alm_jax.generation.engine import ResponseGenerator
    from alm_jax.generation.server import ChatServer
    from alm_jax.weights.demo_models import resolve_model_path
    gen = ResponseGenerator(resolve_model_path(args.llm), batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    server = ChatServer(gen, host=args.host, port=args.port).start()
    print(f"serving {server.model_name} at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0
