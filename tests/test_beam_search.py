"""Beam search (alm_jax/models/beam.py) equals `transformers` `generate(num_beams=4, no_repeat_ngram_size=2,
repetition_penalty=2.0, do_sample=False)` token for token on a tiny random Llama (left-padded batch against each
prompt alone; with and without EOS; every `early_stopping` mode); one beam with early stopping is greedy; the ALM
entry on a text-only batch equals the text entry without prompt history; `eval.decoding` reaches the evaluation
Answerer; bad settings raise ConfigError."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import alm_jax
from alm_jax.errors import ConfigError
from alm_jax.models.beam import BeamSettings, beam_generate, beam_search
from alm_jax.models.llm import generate_greedy
from hf_tiny_llm import left_padded_batch, save, tiny_hf_llm

NEW = 10
LENGTHS = [5, 9, 7]
MATS = dict(num_beams=4, no_repeat_ngram_size=2, repetition_penalty=2.0, length_penalty=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs torch with one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(HF tiny Llama, our DecoderLM with the same weights, left-padded ids [3, 9], mask, unpadded rows)."""
    hf = tiny_hf_llm("llama", seed=5)
    ours = alm_jax.load_llm(save(hf, tmp_path_factory.mktemp("llama")), dtype=jnp.float32)
    ids, mask, _, rows = left_padded_batch(np.random.default_rng(7), LENGTHS)
    return hf, ours, ids, mask, rows


def hf_beam(hf, row, *, eos_id, early_stopping, max_new_tokens=NEW, beam=MATS) -> tuple[list[np.ndarray], np.ndarray]:
    """transformers' beam search on one unpadded prompt -> its 4 hypotheses (new tokens, cut after the first EOS),
    best first, and their scores."""
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(row)[None], dtype=torch.long)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,   # (id 0 is a token here)
                          max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0,
                          early_stopping=early_stopping, num_return_sequences=MATS["num_beams"],
                          output_scores=True, return_dict_in_generate=True, **beam)
    return [cut(h, eos_id) for h in out.sequences[:, len(row):].numpy()], out.sequences_scores.numpy()


def cut(tokens: np.ndarray, eos_id) -> np.ndarray:
    hits = np.flatnonzero(tokens == eos_id) if eos_id is not None else []
    return tokens[: hits[0] + 1] if len(hits) else tokens


def check(ours, theirs, eos_id):
    """ours: beam_search(all_hypotheses=True) of the padded batch; theirs: hf_beam per prompt. Every hypothesis
    equals transformers' (EOS-filled after its EOS), in the same order, with the same score."""
    tokens, scores = map(np.asarray, ours)
    assert tokens.shape == (len(theirs), MATS["num_beams"], NEW) and tokens.dtype == np.int32
    for i, (hyps, ref_scores) in enumerate(theirs):
        for j, ref in enumerate(hyps):
            n = len(ref)
            np.testing.assert_array_equal(tokens[i, j, :n], ref, err_msg=f"prompt {i} hypothesis {j}")
            if n < NEW:
                assert eos_id is not None and ref[-1] == eos_id
                assert (tokens[i, j, n:] == eos_id).all(), tokens[i, j]
        np.testing.assert_allclose(scores[i], ref_scores, rtol=0, atol=1e-4)


def test_matches_transformers_without_eos(twin):
    hf, ours, ids, mask, rows = twin
    settings = BeamSettings(max_new_tokens=NEW, **MATS)
    theirs = [hf_beam(hf, r, eos_id=None, early_stopping=False) for r in rows]
    check(beam_search(ours, ids, mask, settings, all_hypotheses=True), theirs, None)
    got = np.asarray(beam_search(ours, ids, mask, settings))
    assert got.shape == (3, NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, [hyps[0] for hyps, _ in theirs])
    for t, r in zip(got, rows):   # the rules hold: no bigram twice in prompt + answer
        seq = list(r) + list(t)
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))
    plain = np.asarray(beam_search(ours, ids, mask, BeamSettings(max_new_tokens=NEW, num_beams=4)))
    assert (plain != got).any()   # the penalties change the answers of this model


@pytest.fixture(scope="module")
def free(twin):
    """transformers' best answers without EOS, one per prompt."""
    hf, _, _, _, rows = twin
    return [hf_beam(hf, r, eos_id=None, early_stopping=False)[0][0] for r in rows]


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_matches_transformers_with_eos(twin, free, early_stopping):
    hf, ours, ids, mask, rows = twin
    # tokens the model emits mid-answer as EOS (for this seed: best answers ending after 5 and 2 tokens, or after
    # 4; with these, early_stopping=True keeps other lower-ranked hypotheses than False)
    for eos in (int(free[0][5]), int(free[1][3])):
        settings = BeamSettings(max_new_tokens=NEW, eos_id=eos, early_stopping=early_stopping, **MATS)
        theirs = [hf_beam(hf, r, eos_id=eos, early_stopping=early_stopping) for r in rows]
        assert any(len(hyps[0]) < NEW for hyps, _ in theirs), eos   # EOS was reached
        check(beam_search(ours, ids, mask, settings, all_hypotheses=True), theirs, eos)


def test_early_stop_heuristic_matches_transformers(twin):
    """Plain beam search, EOS 34: for this seed transformers' heuristic (early_stopping=False) stops prompt 1
    before max_new_tokens with other hypotheses than "never" (which runs on); both are matched."""
    hf, ours, ids, mask, rows = twin
    plain = dict(num_beams=4, length_penalty=1.0)
    theirs = {es: [hf_beam(hf, r, eos_id=34, early_stopping=es, beam=plain) for r in rows] for es in (False, "never")}
    assert [h.tolist() for h in theirs[False][1][0]] != [h.tolist() for h in theirs["never"][1][0]]
    for es, ref in theirs.items():
        check(beam_search(ours, ids, mask, BeamSettings(max_new_tokens=NEW, eos_id=34, early_stopping=es, **plain),
                          all_hypotheses=True), ref, 34)


def test_one_beam_early_stopping_is_greedy(twin):
    """One beam, no penalties, early_stopping=True (the first finished hypothesis ends a prompt) = greedy, EOS too."""
    _, ours, ids, mask, _ = twin
    free = np.asarray(generate_greedy(ours, ids, mask, max_new_tokens=NEW))
    eos = int(free[1, 4])
    greedy = np.asarray(generate_greedy(ours, ids, mask, max_new_tokens=NEW, eos_id=eos))
    assert greedy[1, 4] == eos   # prompt 1 ends early
    beam = np.asarray(beam_search(ours, ids, mask, BeamSettings(num_beams=1, max_new_tokens=NEW, eos_id=eos,
                                                                early_stopping=True)))
    np.testing.assert_array_equal(beam, greedy)


def test_alm_entry_uses_generated_history_only(twin):
    """beam_generate (the ALM's) on a text-only batch = beam_search with prompt_history=False; a row whose prompt
    tokens would be penalized decodes differently with the prompt counted."""
    from flax import nnx

    _, ours, ids, mask, _ = twin
    settings = BeamSettings(max_new_tokens=NEW, **MATS)   # with_history: the program of the first test

    class TextOnly(nnx.Module):   # what beam_generate reads of an AudioLanguageModel: llm, embed_inputs
        def __init__(self, llm):
            self.llm = llm

        def embed_inputs(self, batch):
            return self.llm.embed(batch["input_ids"])

    alm = np.asarray(beam_generate(TextOnly(ours), {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)},
                                   settings))
    no_history = np.asarray(beam_search(ours, ids, mask, settings, prompt_history=False))
    np.testing.assert_array_equal(alm, no_history)
    with_history = np.asarray(beam_search(ours, ids, mask, settings))
    assert (with_history != no_history).any()


@pytest.mark.parametrize("kw", [dict(num_beams=0), dict(max_new_tokens=0), dict(no_repeat_ngram_size=-1),
                                dict(repetition_penalty=0.0), dict(early_stopping="sometimes"), dict(eos_id=-2),
                                dict(length_penalty=float("nan"))])
def test_bad_settings_raise(kw):
    with pytest.raises(ConfigError):
        BeamSettings(**kw)


def test_eval_decoding_wires_beam_search_into_the_answerer(tiny, tmp_path):
    """`eval.decoding.kind: beam` reaches the Answerer: with one beam and no penalties the ALM's answers (audio
    prompts) equal greedy decoding; MATS's settings map onto BeamSettings; bad settings fail when the Answerer is
    built, naming eval.decoding."""
    import json

    from tiny_setup import tiny_config

    from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record
    from alm_jax.evaluation.answering import Answerer
    from alm_jax.weights.alm_params import build_alm

    paths = json.loads((tiny / "paths.json").read_text())
    greedy_cfg = tiny_config(paths, tmp_path)
    model = build_alm(greedy_cfg.model, seed=0)
    rng = np.random.default_rng(0)
    prompt = [{"role": "user", "content": f"{AUDIO_PLACEHOLDER}\nWhat is it?"}]
    records = [Record(clips=[AudioClip.from_wave(rng.normal(0, 0.1, 8000).astype(np.float32), 16000)],
                      messages=prompt) for _ in range(3)]
    kw = dict(batch_size=4, max_new_tokens=6)
    greedy = Answerer(greedy_cfg, **kw)
    one_beam = Answerer(tiny_config(paths, tmp_path, "eval.decoding.kind=beam", "eval.decoding.num_beams=1",
                                    "eval.decoding.early_stopping=true"), **kw)
    assert greedy.beam is None and one_beam.beam == BeamSettings(num_beams=1, max_new_tokens=6, eos_id=greedy.eos_id,
                                                                 early_stopping=True)
    assert one_beam.alm_answers(model, records) == greedy.alm_answers(model, records)
    mats = Answerer(tiny_config(paths, tmp_path, "eval.decoding.kind=beam", "eval.decoding.no_repeat_ngram_size=2",
                                "eval.decoding.repetition_penalty=2.0", "eval.decoding.early_stopping=never"), **kw)
    assert mats.beam == BeamSettings(num_beams=4, max_new_tokens=6, eos_id=greedy.eos_id, no_repeat_ngram_size=2,
                                     repetition_penalty=2.0, early_stopping="never")
    with pytest.raises(ConfigError, match="eval.decoding"):
        Answerer(tiny_config(paths, tmp_path, "eval.decoding.kind=beam", "eval.decoding.num_beams=0"), **kw)
