"""MATS end to end on tiny models: the mats recipe writes a text-only corpus; training feeds each caption's CLAP
*text* embedding (the CLAP checkpoint's own tokenizer and text tower) with the published noise injection, drawn
from the carried dropout stream, to the mapper (+ LoRA, as published) and overfits a batch; `alm santa` builds the
memory from the training captions and the answerer runs the CLAP *audio* path through Santa."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_alm_clap import TINY_FEATURES
from test_clap import save_tiny_clap

from alm_jax.config import load_config
from alm_jax.data.multihost import sample_builder
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record
from alm_jax.models.alm import RUNNING_STATE, split_trainable
from alm_jax.models.connectors import SantaMemory, l2_normalize, noise_injection
from alm_jax.training.step import split_model_state
from alm_jax.weights.alm_params import build_alm

CAPTION_TOKENS = 24
STEPS = 80


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """torch with one thread for the whole module (conftest.one_torch_thread)."""


def _save_clap_tokenizer(path, texts):
    """A byte-level BPE of 99 entries (the tiny CLAP's text vocabulary) with RoBERTa's special tokens and ids
    (<s> 0, <pad> 1, </s> 2), saved next to the checkpoint as an HF CLAP directory ships its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=99, limit_alphabet=60,
                                                       special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def _source():
    from alm_jax.data.sources.demo import DemoSource
    return DemoSource(seed=4, n_clips=8, kinds=("events",), min_duration=0.5, max_duration=0.9)


def _save_llm(path, tokenizer):
    """A 2-layer random Llama over the SmolLM2 vocabulary whose final norm is 4x sharper: at width 64 a random
    tied head over 49k tokens cannot put a next token above ~2 nats otherwise, whatever the inputs."""
    from hf_tiny_llm import save, tiny_hf_llm
    model = tiny_hf_llm("llama", vocab_size=len(tokenizer), max_position_embeddings=1024, tied=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    save(model, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mats(tmp_path_factory, demo_tokenizer):
    """A MATS corpus written by its recipe through the generation engine (caption / classify items: targets from
    metadata), a tiny CLAP directory with its tokenizer, and a tiny LLM."""
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus
    from alm_jax.recipes.mats import MatsRecipe, training_captions
    root = tmp_path_factory.mktemp("mats")
    llm = _save_llm(root / "llm", demo_tokenizer)
    gen = ResponseGenerator(llm, batch_size=4, max_new_tokens=8, max_prompt_tokens=2048)
    generate_corpus(root / "corpus", _source(), MatsRecipe(seed=1, qa=0.0), gen, n_records=16, records_per_shard=8)
    clap = root / "clap"
    hf = save_tiny_clap(clap)
    (clap / "preprocessor_config.json").write_text(json.dumps(
        {**TINY_FEATURES, "truncation": "rand_trunc", "padding": "repeatpad",
         "feature_extractor_type": "ClapFeatureExtractor"}))
    _save_clap_tokenizer(clap, training_captions([root / "corpus"]))
    return {"root": root, "corpus": str(root / "corpus"), "clap": str(clap), "llm": str(llm), "hf": hf}


def mats_config(m, run_dir, *extra):
    return load_config(None, [
        f"model.llm={m['llm']}", f"model.encoders.0.path={m['clap']}", "model.encoders.0.kind=clap",
        "model.encoders.0.taps=[-1]", "model.encoders.0.tap_indexing=hf", "model.encoders.0.pad_to_seconds=null",
        "model.connector.kind=mats", "model.connector.mapper_tokens=4", "model.connector.num_layers=2",
        "model.connector.num_heads=4", "model.connector.hidden=32", f"model.connector.caption_tokens={CAPTION_TOKENS}",
        "model.lora.rank=8", "model.lora.alpha=32",   # MATS: LoRA r=8, alpha=32 on q/v
        f"data.corpus=[{m['corpus']}]", "data.batch_size=4", "data.max_text_tokens=112",
        "data.max_audio_seconds=1.0", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.total_steps=1000",
        "optim.weight_decay=0", f"checkpoint.dir={run_dir / 'ckpt'}", f"checkpoint.every={STEPS}",
        "checkpoint.async_save=false", f"logging.dir={run_dir}", "logging.every=10", "logging.progress=off",
        "logging.tensorboard=false", f"steps={STEPS}", *extra])


@pytest.fixture(scope="module")
def trained(mats, tmp_path_factory):
    """`train` on a quarter of the text-only corpus (4 records: every batch holds the same samples) until it is
    learnt; the batches it saw (batch_transform)."""
    from alm_jax.training.trainer import train
    run = tmp_path_factory.mktemp("mats_run")
    cfg = mats_config(mats, run, "data.fraction=0.25")
    seen = {}

    def look(step, batch):
        seen[step] = batch
        return batch
    return cfg, train(cfg, batch_transform=look), seen


def test_text_only_training_on_the_recipe_corpus_overfits_its_batch(mats, trained):
    cfg, result, seen = trained
    assert result.step == STEPS and result.stopped_by == "done" and not result.bad_samples.get("bad")
    losses = [result.losses[k] for k in sorted(result.losses)]
    assert all(np.isfinite(v) for v in losses)
    assert losses[0] > 10 and max(losses[-5:]) < 0.05, losses[::10]   # the 4 records' targets are learnt
    batch = seen[1]
    assert all(sorted(map(tuple, seen[k]["caption_ids"])) == sorted(map(tuple, batch["caption_ids"])) for k in seen)
    assert "audio" not in batch and "audio_samples" not in batch   # no waveforms: the text tower feeds the mapper
    assert batch["caption_ids"].shape == batch["caption_mask"].shape == (4, CAPTION_TOKENS)
    # each slot's tokens are the CLAP tokenizer's tokens of a caption the recipe wrote (metadata.audio_texts)
    from alm_jax.recipes.mats import training_captions
    builder = sample_builder(cfg, cfg.model.llm)
    ids, mask = builder.captions(training_captions([mats["corpus"]], fraction=0.25))   # what the run read
    assert {tuple(r) for r in ids} == {tuple(r) for r in batch["caption_ids"]}
    assert batch["caption_mask"].sum(1).min() > 2
    # the 4 mapper tokens sit in the prompt where <audio_text> stood
    assert ((batch["audio_clip"] == 0).sum(1) == 4).all()


def test_caption_path_is_the_clap_text_embedding_with_noise_from_the_carried_stream(mats, tmp_path):
    """The mapper input is HF `get_text_features` of the caption (normalized), noise-injected in training with keys
    from the dropout stream in the train state (so a resumed step draws the same noise) and not in eval mode."""
    cfg = mats_config(mats, tmp_path)
    model = build_alm(cfg.model, seed=0)
    texts = ["A bird chirps while water drips.", "A burst of pink noise rushes, over steady white noise."]
    ids, mask = sample_builder(cfg, cfg.model.llm).captions(texts)
    with torch.no_grad():
        ref = mats["hf"].get_text_features(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long())
    ref = getattr(ref, "pooler_output", ref).numpy()
    emb = np.asarray(model.encoders[0].text_embeds(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=1e-5)

    conn = model.connector
    clean = np.asarray(conn.mapper(l2_normalize(jnp.asarray(emb))))
    graphdef, trainable, frozen = split_trainable(model)
    frozen, model_state = split_model_state(frozen)
    counts = [v for path, v in nnx.to_flat_state(model_state) if "noise" in path]
    assert len(counts) == 1   # the noise stream's counter rides in the train state

    @jax.jit
    def tokens(state, i, m):
        mod = nnx.merge(graphdef, trainable, frozen, state)
        out = mod.caption_tokens(i, m)
        return out, nnx.state(mod, RUNNING_STATE)
    a, state1 = tokens(model_state, jnp.asarray(ids), jnp.asarray(mask))
    b, _ = tokens(state1, jnp.asarray(ids), jnp.asarray(mask))
    a_again, _ = tokens(model_state, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))     # same counter, same noise
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4                          # the next step draws new noise
    assert float(np.max(np.abs(np.asarray(a) - clean))) > 1e-4            # noise is on in training
    # the published injection normalize(normalize(e) + N(0, 0.015 I)) with the key the carried counter gives
    probe = nnx.merge(graphdef, trainable, frozen, model_state)   # a throwaway copy: drawing advances only it
    noised = noise_injection(jnp.asarray(emb), math.sqrt(0.015), probe.connector.noise.rngs())
    np.testing.assert_allclose(np.asarray(a), np.asarray(conn.mapper(noised)), atol=1e-5)
    model.eval()
    np.testing.assert_allclose(np.asarray(model.caption_tokens(jnp.asarray(ids), jnp.asarray(mask))), clean,
                               atol=1e-5)


def test_santa_memory_from_training_captions_drives_audio_inference(mats, trained, tmp_path):
    from alm_jax.cli import main
    from alm_jax.evaluation.answering import Answerer
    from alm_jax.export.source import load_run
    from alm_jax.recipes.mats import training_captions
    cfg, _, _ = trained
    ckpt = cfg.checkpoint.dir
    assert main(["santa", ckpt, "--clusters", "2", "--top-k", "2", "--iters", "4"]) == 0
    memory = SantaMemory.load(f"{ckpt}/santa.safetensors")
    texts = training_captions([mats["corpus"]], fraction=0.25)   # the captions the run trained on
    assert memory.bank.shape == (len(texts), 12) and (memory.cfg.k, memory.cfg.n_clusters) == (2, 2)
    assert memory.cfg.tau == 10.0 and memory.cfg.lam == 0.3   # the published mixing by default

    run = load_run(ckpt)
    answerer = Answerer(run.cfg, batch_size=2, max_new_tokens=4)   # eval.santa=auto finds the file
    assert answerer.santa is not None
    off = Answerer(dataclasses.replace(run.cfg, eval=dataclasses.replace(run.cfg.eval, santa="off")), batch_size=2)
    assert off.santa is None

    src = _source()
    records = []
    for i in range(2):
        _, wave = src[i]
        records.append(Record(clips=[AudioClip.from_wave(np.asarray(wave, np.float32), 16000)], messages=[
            {"role": "user", "content": f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>\nDescribe the audio."}]))
    answers = answerer.alm_answers(run.model, records)
    assert len(answers) == 2 and all(len(a.ids) >= 1 for a in answers)
    assert run.model.connector.santa is None   # the answerer mixed on a view, the model stays as it was

    # the audio path with Santa: CLAP audio embedding -> Santa mix (published noise on the retrieved captions)
    # -> mapper; without Santa: the embedding straight to the mapper
    view = answerer.with_santa(run.model)
    audio = np.zeros((2, 16000), np.float32)
    samples = []
    for i, r in enumerate(records):
        w = r.clips[0].decode(target_sr=16000)[:16000]
        audio[i, :len(w)] = w
        samples.append(len(w))
    audio, samples = jnp.asarray(audio), jnp.asarray(samples, jnp.int32)
    z_a = run.model.encoders[0](audio, samples)
    mixed = memory(z_a, jax.random.PRNGKey(memory.cfg.seed))
    want = np.asarray(run.model.connector.mapper(mixed))
    np.testing.assert_allclose(np.asarray(view.audio_tokens(audio, samples)), want, atol=1e-5)
    plain = np.asarray(run.model.audio_tokens(audio, samples))
    np.testing.assert_allclose(plain, np.asarray(run.model.connector.mapper(z_a)), atol=1e-5)
    assert np.abs(plain - want).max() > 1e-4


def test_text_only_records_need_a_mats_run_on_a_clap_with_its_tokenizer(mats, tmp_path):
    import shutil

    from alm_jax.data.corpus import Corpus
    from alm_jax.data.pipeline import BAD, caption_tokenizer
    from alm_jax.errors import ConfigError
    cfg = mats_config(mats, tmp_path)
    raw = Corpus(mats["corpus"]).raw(0)
    assert BAD not in sample_builder(cfg, cfg.model.llm)(raw)
    desta = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, connector=dataclasses.replace(cfg.model.connector, kind="desta")))
    assert sample_builder(desta, cfg.model.llm)(raw)[BAD] == "text_only"   # counted as a bad sample, named
    bare = tmp_path / "clap_without_tokenizer"
    bare.mkdir()
    shutil.copy(f"{mats['clap']}/config.json", bare)
    no_tok = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, encoders=(dataclasses.replace(cfg.model.encoders[0], path=str(bare)),)))
    with pytest.raises(ConfigError, match="no CLAP text tokenizer"):
        caption_tokenizer(no_tok)
