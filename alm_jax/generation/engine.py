"""Corpus generation: the backbone LLM writes every record's target from the recipe's text-only prompt.

    stats = generate_corpus("corpora/demo", DemoSource(0, 1000), DestaRecipe(seed=0), "models/smollm2",
                            n_records=1000, records_per_shard=100)

Sharding, atomic writes, resume and bad-record accounting are `write_corpus`'s: record `i` is
`recipe.item_for(i, source)` answered by the LLM. `write_corpus` asks for records one at a time, in order,
one shard after another; to answer in batches, `_ShardRecords` prepares and generates a whole shard when
its first record is requested, keeps the finished records, and hands them out (one shard in memory at a
time). A finished shard is never regenerated, and a rerun over a finished corpus loads no model.

Batching (`ResponseGenerator`): prompts are chat-templated and tokenized, sorted by length within the
shard, cut into batches of `batch_size` rows, each left-padded to the next multiple of `prompt_bucket`
tokens; a short last batch is filled with copies of its last row. So jit compiles at most
`ceil(max_prompt_tokens / prompt_bucket)` shapes. Decoding is greedy, so a row's answer does not depend
on its batch (up to float rounding; the tests compare batched against one-by-one decoding).

Per item: a recipe/audio error (`DataError`/`AudioError`, e.g. an empty seed description) or a prompt
longer than `max_prompt_tokens` (kind `prompt_too_long`) is re-raised when that record is requested, so
`write_corpus` counts it as bad. A response is dropped (counted `filtered`) when it has no letter or digit,
when the recipe's `accepts(text)` (if it has one) rejects it, or when it was cut off at `max_new_tokens`
and `drop_unfinished` is set. Records carry `metadata.response_tokens` and
`metadata.finished` (ended with EOS). Determinism: a shard's bytes depend only on its items, the model
and the settings, not on the process count or on which shards ran before; nothing time-dependent is stored.

Settings: the corpus records what produced it (`generation_settings`: recipe and its options, seed,
generator name, sampling, token limits, source; `alm generate` passes its own, command-line, form) in
layout.json and the manifest. A rerun into the same directory with other settings stops before any
model loads (`DataError` kind `settings_mismatch`, see `data/corpus.py`): a corpus never mixes records
of two settings.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alm_jax.data.bad_data import data_error
from alm_jax.data.corpus import shard_name, write_corpus
from alm_jax.data.records import Record
from alm_jax.errors import AudioError, ConfigError, DataError
from alm_jax.generation import sampler
from alm_jax.weights.llm_params import load_llm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Response:
    """One generated answer: stripped text, tokens generated before EOS, whether EOS ended it."""
    text: str
    n_tokens: int
    finished: bool


def is_degenerate(text: str) -> bool:
    """True for a response that cannot be a training target: empty, or without any letter or digit."""
    return not any(ch.isalnum() for ch in text)


class ResponseGenerator:
    """Batched chat answers from a local HF LLM directory (config + safetensors + tokenizer).

    The tokenizer (with its chat template) loads now, the model (`load_llm`, parameters in `dtype`, placed
    on `mesh` by their logical axes when given, e.g. fsdp/tensor over this process's devices) on the first
    `generate`. `scan_layers`: one compiled block instead of one per layer; None = scanned on accelerators,
    unrolled on CPU, where a scanned decode copies every layer's weights out of the stack at each token
    (BENCHMARKS.md: 64 vs 80 tokens per CPU-second for SmolLM2) and compile time is small either way. Decoding is `generation.sampler` with `sampling` (default greedy); its EOS ids are the
    tokenizer's EOS plus the model's `generation_config.json` ones. `stop_strings` cut a decoded answer (a
    hit counts as finished). `name` is the generator recorded in provenance (default: the directory name).
    """

    def __init__(self, llm_dir: str | os.PathLike, *, batch_size: int = 16, max_new_tokens: int = 64,
                 max_prompt_tokens: int = 512, prompt_bucket: int = 64, dtype=jnp.float32,
                 tokenizer_dir: str | os.PathLike | None = None, name: str | None = None,
                 sampling: sampler.SamplingConfig | None = None, stop_strings: Sequence[str] = (), mesh=None,
                 scan_layers: bool | None = None):
        for key, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                           ("max_prompt_tokens", max_prompt_tokens), ("prompt_bucket", prompt_bucket)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"generation: {key} must be a positive int, got {value!r}")
        from transformers import AutoTokenizer

        self.llm_dir = Path(llm_dir)
        if not (self.llm_dir / "config.json").is_file():
            raise ConfigError(f"generation: {self.llm_dir} is not an HF model directory (no config.json); "
                              "pass the directory of the backbone LLM, e.g. `alm models prepare-demo` output")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or llm_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"generation: the tokenizer in {tokenizer_dir or llm_dir} has no chat template; "
                              "use an instruct model")
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError(f"generation: the tokenizer in {tokenizer_dir or llm_dir} defines no eos_token")
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad
        eos_ids = (self.eos_id, *_generation_config_eos(self.llm_dir))
        base = sampling or sampler.SamplingConfig(max_new_tokens=max_new_tokens)
        self.sampling = dataclasses.replace(base, max_new_tokens=max_new_tokens,
                                            eos_ids=tuple(dict.fromkeys(base.eos_ids + eos_ids)))
        self.stop_strings, self.mesh = tuple(stop_strings), mesh
        if self.stop_strings:   # rows end at the token that completes a stop string; the text is cut there
            self.sampling = dataclasses.replace(self.sampling, stop_ids=self.sampling.stop_ids + tuple(
                tuple(self.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in self.stop_strings))
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.max_prompt_tokens, self.prompt_bucket = max_prompt_tokens, prompt_bucket
        self.dtype = dtype
        self.scan_layers = jax.default_backend() != "cpu" if scan_layers is None else scan_layers
        self.name = name or self.llm_dir.resolve().name
        self.model = None
        self.tokens_generated = 0
        self.seconds_generating = 0.0

    def prompt_ids(self, messages: Sequence[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        """Token ids of the chat-templated `messages` followed by the assistant header (and `assistant_prefix`,
        the start of the assistant turn, when given)."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"])

    def load(self) -> None:
        """Load the model now (otherwise the first `generate` does); checks the context length fits."""
        if self.model is not None:
            return
        model = load_llm(self.llm_dir, dtype=self.dtype, mesh=self.mesh, scan_layers=self.scan_layers)
        self.sampling.check_vocab(model.cfg.vocab_size)
        longest = self.bucket_width(self.max_prompt_tokens) + self.max_new_tokens
        if longest > model.cfg.max_position_embeddings:
            raise ConfigError(f"generation: max_prompt_tokens (bucketed) + max_new_tokens = {longest} exceeds "
                              f"the model's max_position_embeddings {model.cfg.max_position_embeddings}")
        self.model = model

    def bucket_width(self, length: int) -> int:
        """Padded prompt width for a longest prompt of `length` tokens: the next multiple of prompt_bucket."""
        return max(1, math.ceil(length / self.prompt_bucket)) * self.prompt_bucket

    def generate(self, prompts: Sequence[Sequence[int]], row_ids: Sequence[int] | None = None,
                 max_new: Sequence[int] | None = None, sampling: sampler.SamplingConfig | None = None) -> list[Response]:
        """Answers to token-id prompts, in order, `batch_size` rows per call of the model. `row_ids` (default
        0..n-1) seed each row's sampling randomness: give the item index, and an answer depends only on
        (seed, item, prompt), not on which batch or process produced it. `max_new`: per-prompt token
        limits (at most `max_new_tokens`; default all `max_new_tokens`). `sampling`: this call's settings
        instead of `self.sampling` (e.g. a recipe stage's thinking budget)."""
        if not prompts:
            return []
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        max_new = [self.max_new_tokens] * len(prompts) if max_new is None else list(max_new)
        self.load()
        too_long = [len(p) for p in prompts if len(p) > self.max_prompt_tokens]
        if too_long:
            raise ConfigError(f"generation: prompts of {too_long} tokens exceed max_prompt_tokens "
                              f"{self.max_prompt_tokens}")
        order = sorted(range(len(prompts)), key=lambda k: (len(prompts[k]), k))
        out: list[Response | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            new_tokens = self._generate_batch([prompts[k] for k in rows], [row_ids[k] for k in rows],
                                              [max_new[k] for k in rows], sampling or self.sampling)
            for k, tokens in zip(rows, new_tokens):
                out[k] = self._response(tokens)
        return out

    def _generate_batch(self, batch: list[Sequence[int]], row_ids: list[int], limits: list[int],
                        sampling: sampler.SamplingConfig) -> np.ndarray:
        """New tokens `[len(batch), max_new_tokens]` of up to batch_size prompts (padded to a full batch;
        `sampler.PAD` after a row's EOS)."""
        width = self.bucket_width(max(len(p) for p in batch))
        ids = np.full((self.batch_size, width), self.pad_id, np.int32)
        mask = np.zeros((self.batch_size, width), np.int32)
        rows = np.zeros((self.batch_size,), np.int32)
        limit = np.zeros((self.batch_size,), np.int32)
        for row in range(self.batch_size):
            k = min(row, len(batch) - 1)
            ids[row, width - len(batch[k]):] = batch[k]
            mask[row, width - len(batch[k]):] = 1
            rows[row], limit[row] = row_ids[k], limits[k]
        t0 = time.perf_counter()
        tokens, lengths = sampler.generate(self.model, ids, mask, sampling, row_ids=rows, max_new_per_row=limit)
        tokens = np.asarray(tokens)[:len(batch)]
        self.seconds_generating += time.perf_counter() - t0
        self.tokens_generated += int(np.asarray(lengths)[:len(batch)].sum())
        return tokens

    def _length(self, tokens: np.ndarray) -> tuple[int, bool]:
        """(tokens before the first EOS, whether there is one) of one row of new tokens."""
        hits = np.flatnonzero(np.isin(tokens, self.sampling.eos_ids))
        return (int(hits[0]), True) if hits.size else (int((tokens != sampler.PAD).sum()), False)

    def _response(self, tokens: np.ndarray) -> Response:
        n, finished = self._length(tokens)
        text = self.tokenizer.decode(tokens[:n].tolist(), skip_special_tokens=True)
        if self.stop_strings:
            (text,), (hit,) = sampler.truncate_at_stop_strings([text], self.stop_strings)
            finished = finished or hit
        return Response(text=text.strip(), n_tokens=n, finished=finished)


def _generation_config_eos(llm_dir: Path) -> tuple[int, ...]:
    """EOS ids of the model's `generation_config.json` (an int or a list), if it has one."""
    import json
    path = llm_dir / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


STATS_DIR = "generation"          # per-shard generation stats, beside the corpus shards
REPORT = "generation_report.json"  # the final report, beside manifest.json


class _ShardRecords:
    """`record_fn(i)` for `write_corpus` that builds a whole shard's records in batches on first request.

    After building a shard it writes `STATS_DIR/<shard>.json` (kept responses' token lengths, filtered
    counts by reason; atomically, before the shard itself is written, and the same bytes on a rerun) and
    calls `on_shard(stats)`."""

    def __init__(self, source, recipe, generator: ResponseGenerator, records_per_shard: int, n_records: int,
                 audio_format: str, drop_unfinished: bool, out_dir: str | os.PathLike | None = None,
                 on_shard=None, trim_unfinished: bool = False):
        self.source, self.recipe, self.generator = source, recipe, generator
        self.records_per_shard, self.n_records = records_per_shard, n_records
        self.audio_format, self.drop_unfinished, self.trim_unfinished = audio_format, drop_unfinished, trim_unfinished
        self.out_dir, self.on_shard = out_dir, on_shard
        self._accepts = getattr(recipe, "accepts", None)
        self._cache: dict[int, Record | None | Exception] = {}
        self.filtered: collections.Counter[str] = collections.Counter()

    def __call__(self, index: int) -> Record | None:
        if index not in self._cache:
            self._cache = self._build_shard(index // self.records_per_shard)
        outcome = self._cache.pop(index)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _build_shard(self, shard: int) -> dict[int, Record | None | Exception]:
        """Every item of `shard`: prompts (skipped items and metadata answers need no LLM), stage 0 answered
        in batches, then each later stage of a multi-stage recipe, then the recipe's verdict per item."""
        span = range(shard * self.records_per_shard, min((shard + 1) * self.records_per_shard, self.n_records))
        outcomes: dict[int, Record | None | Exception] = {}
        items, prompts, outputs = {}, {}, {}
        filtered0 = collections.Counter(self.filtered)
        for i in span:
            try:
                item = self.recipe.item_for(i, self.source)
                if getattr(item, "skip_reason", None):
                    self.filtered[item.skip_reason] += 1
                    outcomes[i] = None
                    continue
                items[i] = item
                if getattr(item, "fixed_response", None) is not None:
                    outputs[i] = [Response(item.fixed_response, 0, True)]
                    continue
                prompts[i] = self._prompt(item.generation_messages, i, item.item_id,
                                          getattr(item, "response_prefix", None) or "")
            except (AudioError, DataError) as e:
                items.pop(i, None)
                outcomes[i] = e
        t0, tokens0 = time.perf_counter(), self.generator.tokens_generated
        for i, r in zip(prompts, self.generator.generate(list(prompts.values()), row_ids=list(prompts))):
            prefix = getattr(items[i], "response_prefix", None)
            outputs[i] = [dataclasses.replace(r, text=f"{prefix} {r.text}".strip()) if prefix else r]
        for stage in range(1, getattr(self.recipe, "n_stages", 1)):
            self._run_stage(stage, [i for i in prompts if i in outputs], items, outputs, outcomes)
        seconds, tokens = time.perf_counter() - t0, self.generator.tokens_generated - tokens0
        for i, outs in outputs.items():
            outcomes[i] = self._record(items[i], outs)
        kept = [i for i in outputs if isinstance(outcomes[i], Record)]
        stats = {"shard": shard, "items": len(span), "responses": len(prompts),
                 "kept_response_tokens": [outputs[i][-1].n_tokens for i in kept],
                 "filtered": dict(self.filtered - filtered0)}
        self._save_stats(shard, stats)
        log.info("shard %d: %d prompts, %d tokens in %.1f s (%.1f tokens/s); filtered so far: %s", shard,
                 len(prompts), tokens, seconds, tokens / seconds if seconds else 0.0, dict(self.filtered))
        if self.on_shard is not None:
            self.on_shard({**stats, "tokens": tokens, "seconds": seconds})
        return outcomes

    def _prompt(self, messages, i: int, item_id: str, assistant_prefix: str = ""):
        ids = (self.generator.prompt_ids(messages, assistant_prefix) if assistant_prefix
               else self.generator.prompt_ids(messages))
        if len(ids) > self.generator.max_prompt_tokens:
            raise data_error("prompt_too_long", f"generation prompt of item {i} ({item_id}) is {len(ids)} tokens, "
                                                f"over max_prompt_tokens {self.generator.max_prompt_tokens}; raise it")
        return ids

    def _run_stage(self, stage: int, alive: list[int], items, outputs, outcomes) -> None:
        """Later LLM pass `stage` for the items in `alive`: the recipe's `stage_prompt` of each, answered in
        batches of equal settings (per-stage token cap; a thinking budget becomes the sampler's budget
        forcing with the recipe's message). An item whose stage prompt fails is a bad item."""
        groups: dict[tuple, dict[int, Any]] = collections.defaultdict(dict)
        for i in alive:
            try:
                sp = self.recipe.stage_prompt(items[i], stage, outputs[i])
                key = (sp.max_new_tokens, sp.thinking_budget, sp.budget_message, sp.assistant_prefix)
                groups[key][i] = self._prompt(sp.messages, i, items[i].item_id, sp.assistant_prefix)
            except (AudioError, DataError) as e:
                outputs.pop(i)
                outcomes[i] = e
        for (cap, budget, message, prefix), prompts in groups.items():
            sampling = self._stage_sampling(budget, message) if budget else None
            limit = min(cap or self.generator.max_new_tokens, self.generator.max_new_tokens)
            answers = self.generator.generate(list(prompts.values()), row_ids=[i + stage * self.n_records for i in prompts],
                                              max_new=[limit] * len(prompts), sampling=sampling)
            for i, r in zip(prompts, answers):
                outputs[i].append(dataclasses.replace(r, text=prefix + r.text) if prefix else r)

    def _stage_sampling(self, budget: int, message: str):
        """The generator's sampling with ALARM budget forcing: after `budget` tokens inside <think>, force
        `message` then </think> (token ids from the generator's tokenizer)."""
        tok = getattr(self.generator, "tokenizer", None)
        if tok is None or not hasattr(self.generator, "sampling"):
            raise ConfigError("this recipe sets a thinking budget; the generator needs a tokenizer and a sampler "
                              "(the native backend)")
        ids = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return dataclasses.replace(self.generator.sampling, think_budget=budget, think_open_ids=ids("<think>"),
                                   think_close_ids=ids("</think>"), budget_forcing_ids=ids(message) if message else ())

    def _save_stats(self, shard: int, stats: dict) -> None:
        if self.out_dir is None:
            return
        import json
        folder = Path(self.out_dir) / STATS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        num_shards = -(-self.n_records // self.records_per_shard)
        path = folder / f"{shard_name(shard, num_shards)}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(stats, sort_keys=True))
        os.replace(tmp, path)

    def _rejection(self, item, outputs: list[Response]) -> tuple[str | None, Any]:
        """`(reason to drop, None)` or `(None, target)`. With `trim_unfinished`, a last answer cut at
        max_new_tokens is first cut back to its whole sentences (`whole_sentences`; 'unfinished' when it has
        none), so the recipe judges the text that becomes the target. Then the recipe's verdict (`finalize`, or
        `accepts` for a recipe without it) and the engine's own checks on the target (no letter or digit:
        'degenerate'; cut at max_new_tokens with `drop_unfinished`: 'unfinished')."""
        trimmed = self.trim_unfinished and not self.drop_unfinished and not outputs[-1].finished
        if trimmed:
            whole = whole_sentences(outputs[-1].text)
            if whole is None:
                return "unfinished", None
            outputs = [*outputs[:-1], dataclasses.replace(outputs[-1], text=whole)]
        finalize = getattr(self.recipe, "finalize", None)
        if finalize is not None:
            target = finalize(item, outputs, self._count_tokens)
            if not target.kept:
                return target.reason or "rejected_by_recipe", None
            text, metadata = target.text, dict(target.metadata)
        else:
            text, metadata = outputs[-1].text, {}
            if self._accepts is not None and not self._accepts(text):
                return "rejected_by_recipe", None
        if is_degenerate(text):
            return "degenerate", None
        if self.drop_unfinished and not outputs[-1].finished:
            return "unfinished", None
        if trimmed:
            metadata["trimmed"] = True
        return None, (text, metadata)

    def _count_tokens(self, text: str) -> int:
        tok = getattr(self.generator, "tokenizer", None)
        if tok is None:
            raise ConfigError("the recipe counts target tokens; give the generator a tokenizer (--llm DIR)")
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def _record(self, item, outputs: list[Response]) -> Record | None | Exception:
        reason, target = self._rejection(item, outputs)
        if reason is not None:
            self.filtered[reason] += 1
            return None
        text, metadata = target
        last = outputs[-1]
        try:
            return item.to_record(text, self.generator.name, self.audio_format,
                                  {"response_tokens": last.n_tokens, "finished": last.finished, **metadata})
        except (AudioError, DataError) as e:
            return e


_SENTENCE_END = re.compile(r"[.!?][\"'*)\]]*(?=\s|$)")


def whole_sentences(text: str) -> str | None:
    """`text` up to the end of its last complete sentence (`.`, `!` or `?`, with closing quotes, brackets or
    markdown stars, then a space or the end), or None when it has none. An answer cut at the token limit
    otherwise ends mid-sentence, and its target would teach the ALM to stop there (the EOS follows it)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else None


def _describe(value: Any) -> Any:
    """A JSON-able, short description of an option value (long values by their sha256)."""
    import hashlib
    import json
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 200):
        return value
    if callable(value) and not isinstance(value, (list, tuple, dict)):
        return f"<{getattr(value, '__qualname__', type(value).__name__)}>"
    text = json.dumps(value, sort_keys=True, default=str)
    return json.loads(text) if len(text) <= 200 else {"sha256": hashlib.sha256(text.encode()).hexdigest()}


def _public_options(obj: Any) -> dict[str, Any]:
    return {k: _describe(v) for k, v in sorted(vars(obj).items())
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str, list, tuple, dict)))}


def generation_settings(source, recipe, generator, *, audio_format: str = "flac",
                        drop_unfinished: bool = False, trim_unfinished: bool = False) -> dict[str, Any]:
    """What makes the records of a generated corpus, as recorded in its layout.json (see the module doc):
    the recipe (id and public options, long ones by hash), the generator (name, sampling, token limits,
    stop strings), the source (type and public options), the audio format, `drop_unfinished` and, when set,
    `trim_unfinished` (absent otherwise, so corpora made before it keep their settings)."""
    sampling = getattr(generator, "sampling", None)
    return {
        **({"trim_unfinished": True} if trim_unfinished else {}),
        "recipe": getattr(recipe, "recipe_id", type(recipe).__name__), "recipe_options": _public_options(recipe),
        "generator": getattr(generator, "name", type(generator).__name__),
        "sampling": ({k: _describe(v) for k, v in dataclasses.asdict(sampling).items()}
                     if dataclasses.is_dataclass(sampling) else None),
        "max_new_tokens": getattr(generator, "max_new_tokens", None),
        "max_prompt_tokens": getattr(generator, "max_prompt_tokens", None),
        "stop_strings": list(getattr(generator, "stop_strings", ())),
        "source": type(source).__name__, "source_options": _public_options(source),
        "audio_format": audio_format, "drop_unfinished": bool(drop_unfinished),
    }


def generate_corpus(out_dir: str | os.PathLike, source, recipe, llm_dir: str | os.PathLike | ResponseGenerator, *,
                    n_records: int, records_per_shard: int, batch_size: int = 16, max_new_tokens: int = 64,
                    max_prompt_tokens: int = 512, prompt_bucket: int = 64, dtype=jnp.float32,
                    process_index: int = 0, process_count: int = 1, audio_format: str = "flac",
                    drop_unfinished: bool = False, on_shard=None, settings: dict[str, Any] | None = None,
                    trim_unfinished: bool = False, **write_options: Any) -> list[dict[str, Any]]:
    """Write this process's shards of a self-generated corpus; returns their `.done` stats (see `write_corpus`).

    source: `source[i] -> (ClipMeta, waveform)` with `len`; recipe: has `item_for(i, source) ->
    GenerationItem` (e.g. `DestaRecipe`); llm_dir: the backbone LLM's HF directory, or a ready generator
    (`ResponseGenerator`, `openai_backend.OpenAIGenerator`; then batch_size, max_*_tokens, prompt_bucket
    and dtype are its own).
    `write_options` go to `write_corpus` (writer_options, max_bad_fraction, min_seen, verify_existing,
    finalize, resume_command). on_shard(stats): called after each shard this call generates (progress).
    drop_unfinished / trim_unfinished: what happens to an answer cut at max_new_tokens (`_ShardRecords`).
    Per-shard stats land in `out_dir/generation/`; `generation_report(out_dir)` sums them once the corpus
    is finished. settings: what the corpus records as its settings (default `generation_settings(...)`); a
    rerun into `out_dir` with other settings raises `DataError` kind `settings_mismatch` before any model
    loads.
    """
    if hasattr(llm_dir, "generate") and hasattr(llm_dir, "prompt_ids"):   # a ready generator (any backend)
        generator = llm_dir
    else:
        generator = ResponseGenerator(llm_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      max_prompt_tokens=max_prompt_tokens, prompt_bucket=prompt_bucket, dtype=dtype)
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
        raise ConfigError(f"generation: records_per_shard must be a positive int, got {records_per_shard!r}")
    if settings is None:
        settings = generation_settings(source, recipe, generator, audio_format=audio_format,
                                       drop_unfinished=drop_unfinished, trim_unfinished=trim_unfinished)
    record_fn = _ShardRecords(source, recipe, generator, records_per_shard, n_records, audio_format, drop_unfinished,
                              out_dir, on_shard, trim_unfinished=trim_unfinished)
    return write_corpus(out_dir, record_fn, n_records, records_per_shard, process_index, process_count,
                        settings=settings, **write_options)


LENGTH_BINS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def generation_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The final report of a finished corpus (manifest + per-shard stats), written to `out_dir/REPORT`:
    records kept, responses filtered by reason, bad items by kind, and the kept responses' token-length
    histogram (`LENGTH_BINS`: counts of lengths in [bin_i, bin_i+1), the last bin open)."""
    import json
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    filtered: collections.Counter[str] = collections.Counter()
    lengths: list[int] = []
    items = 0
    for f in sorted((out / STATS_DIR).glob("*.json")):
        stats = json.loads(f.read_text())
        filtered.update(stats["filtered"])
        lengths += stats["kept_response_tokens"]
        items += stats["items"]
    edges = list(LENGTH_BINS) + [max(LENGTH_BINS[-1] + 1, max(lengths, default=0) + 1)]
    counts = np.histogram(lengths, bins=edges)[0].tolist() if lengths else [0] * len(LENGTH_BINS)
    report = {"records_kept": manifest["total_records"], "items": items, "filtered": dict(filtered),
              "bad": manifest.get("bad_data", {}).get("bad", {}),
              "response_tokens": {"mean": float(np.mean(lengths)) if lengths else 0.0,
                                  "max": max(lengths, default=0),
                                  "histogram": {f"{lo}-{hi - 1}" if i < len(LENGTH_BINS) - 1 else f">={lo}": c
                                                for i, (lo, hi, c) in enumerate(zip(edges, edges[1:], counts))}}}
    tmp = out / f"{REPORT}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / REPORT)
    return report
