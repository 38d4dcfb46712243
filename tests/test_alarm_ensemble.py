"""ALARM-E (alm_jax/evaluation/ensemble.py): the prompt layout of Blinorot/ALARM `generate_vllm.py` with each
member's own audio tokens, greedy answers from those embeddings, and the refusals.

Two tiny ALARM members over one tiny LLM: a conv ("batch") adapter and an MLP adapter, so their spans differ in
length (T // 2 + 2 vs T + 2) and their tokens differ (other weights)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax.data.records import AudioClip, Record
from alm_jax.errors import ConfigError

SR = 16000
SYSTEM = "You are an audio-understanding model. Listen to the audio and respond to the query."
UNIT = "<start_audio><audio><end_audio>"
QUESTION = f"{UNIT}\n\nWhat do you hear?"
# the separator strings, written out as in Blinorot/ALARM generate_vllm.py (commit 67c6776b), for N = 2
INTRO_2 = ("You will hear the same audio 2 times and perceive different aspects of it, e.g., content description, "
           "environment description, speech transcription, sound quality, etc.. Depending on the audio the aspects "
           "may differ.Process all of the information to make a decision.\n\n")
SEP_1, SEP_2 = ("This is what you hear in the audio for the (1/2) time:\n",
                "This is what you hear in the audio for the (2/2) time:\n")


def _member_cfg(paths, run_dir, adapter, *extra):
    from tiny_setup import tiny_config
    enc = f"{{path: {paths['whisper']}, taps: [0, 1], tap_indexing: hf, pad_to_seconds: null}}"
    return tiny_config(paths, run_dir, "model.connector.kind=alarm", f"model.connector.adapters=[{adapter}]",
                       f"model.encoders=[{enc}]", "model.connector.adapter_dim=16", *extra)


def _record(i: int, seconds: float, n_clips: int = 1) -> Record:
    r = np.random.default_rng(i)
    t = np.arange(int(SR * seconds)) / SR
    wave = (0.3 * np.sin(2 * np.pi * (220 + 70 * i) * t) + 0.05 * r.standard_normal(t.size)).astype(np.float32)
    content = QUESTION if n_clips == 1 else f"{UNIT}\n{UNIT}\nSame?"
    return Record(clips=[AudioClip.from_wave(wave, SR)] * n_clips,
                  messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from alm_jax.evaluation.ensemble import AlarmEnsemble
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    root = tmp_path_factory.mktemp("ensemble")
    cfgs = [_member_cfg(paths, root / "ca", "batch"), _member_cfg(paths, root / "r", "mlp")]
    models = [build_alm(c.model, seed=s) for c, s in zip(cfgs, (1, 2))]
    return paths, cfgs, models, AlarmEnsemble(models)


def _member_tokens(answerer, models, records):
    """Member i's audio tokens `[B, M_i, d]` of the records' clips, batched as the answerer batches them (ALARM's
    adapters see the batch trimmed to its longest clip, so a clip's last tokens depend on its batch)."""
    waves = [r.clips[0].decode(target_sr=SR, mono=True) for r in records]
    buffer = np.zeros((len(waves), answerer.builder.audio.buffer_samples), np.float32)
    for k, w in enumerate(waves):
        buffer[k, :w.size] = w
    samples = jnp.asarray([w.size for w in waves], jnp.int32)
    return [_audio_tokens(m, jnp.asarray(buffer), samples) for m in models]


@nnx.jit
def _audio_tokens(model, audio, samples):
    return model.audio_tokens(audio, samples)


def _hand_built(answerer, models, record, tokens, row):
    """(ids, audio_clip, audio_pos, embeddings `[T, d]`) of ALARM-E's prompt for `record`, built piece by piece
    here: each text piece tokenized alone, member i's span = member i's own audio tokens of the clip
    (`tokens[i][row]`, from `_member_tokens`)."""
    tok = answerer.tokenizer
    rendered = tok.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    before, after = rendered.split(UNIT)
    n = record.clips[0].decode(target_sr=SR, mono=True).size
    pieces = [before, INTRO_2, SEP_1 + "<start_audio>", 0, "<end_audio>\n", SEP_2 + "<start_audio>", 1,
              "<end_audio>\n", after]
    llm = models[0].llm
    ids, clip, pos, embeds = [], [], [], []
    for p in pieces:
        if isinstance(p, str):
            t = tok(p, add_special_tokens=False).input_ids
            ids += t
            clip += [-1] * len(t)
            pos += [-1] * len(t)
            embeds.append(llm.embed(jnp.asarray([t], jnp.int32))[0])
        else:
            span = models[p].num_audio_tokens(n)
            ids += [answerer.builder.tok.placeholder_id] * span
            clip += [p] * span
            pos += list(range(span))
            embeds.append(tokens[p][row, :span].astype(llm.dtype))
    return np.asarray(ids), np.asarray(clip), np.asarray(pos), jnp.concatenate(embeds)


def test_prompt_layout_and_each_members_own_audio_tokens(setup):
    """The batch rows hold ALARM's pieces in ALARM's order, one span per member of that member's length, and the
    spliced embeddings are the hand-built concatenation (member i's tokens in span i)."""
    from alm_jax.evaluation.answering import Answerer
    from alm_jax.evaluation.ensemble import EnsembleAnswerer
    _, cfgs, models, ens = setup
    answerer = EnsembleAnswerer(cfgs, batch_size=2, max_new_tokens=4)
    records = [_record(0, 0.45), _record(1, 0.3)]
    batch = answerer._prompt_batch(records)
    assert batch["audio"].shape[0] == 2 * 2 and batch["audio_samples"].tolist()[:2] == [7200, 7200]
    embeds = nnx.jit(lambda m, x: m.embed_inputs(x))(ens, {k: jnp.asarray(v) for k, v in batch.items()})
    tokens = _member_tokens(answerer, models, records)
    for b, rec in enumerate(records):
        ids, clip, pos, hand = _hand_built(answerer, models, rec, tokens, b)
        n = rec.clips[0].decode(target_sr=SR).size
        assert models[0].num_audio_tokens(n) != models[1].num_audio_tokens(n)   # spans of their own lengths
        keep = batch["attention_mask"][b] == 1
        np.testing.assert_array_equal(batch["input_ids"][b][keep], ids)
        np.testing.assert_array_equal(batch["audio_clip"][b][keep], clip)
        np.testing.assert_array_equal(batch["audio_pos"][b][keep], pos)
        np.testing.assert_allclose(np.asarray(embeds[b][keep]), np.asarray(hand), atol=1e-5, rtol=1e-5)
        text = answerer.tokenizer.decode(ids[clip == -1])
        assert text.index(INTRO_2) < text.index(SEP_1) < text.index(SEP_2) < text.index("What do you hear?")
        first, second = np.asarray(hand)[clip == 0][:3], np.asarray(hand)[clip == 1][:3]
        assert not np.allclose(first, second, atol=1e-3)   # the members do hear the clip differently
    # a prompt without audio keeps its own text (no separators, no audio)
    text_only = Record(clips=[], messages=[{"role": "user", "content": "Say hi."}])
    plain = Answerer(cfgs[0], batch_size=2)._prompt_batch([text_only])
    ens_batch = answerer._prompt_batch([text_only])
    assert "audio" not in ens_batch
    np.testing.assert_array_equal(ens_batch["input_ids"], plain["input_ids"])


def test_greedy_answers_equal_a_step_by_step_decode_of_the_hand_built_prompt(setup):
    """`EnsembleAnswerer.alm_answers` (left-padded batches, the last one filled, KV-cache decoding) gives, per
    prompt, the tokens of an argmax loop over the hand-built embeddings (full forward each step, no cache)."""
    from alm_jax.evaluation.ensemble import EnsembleAnswerer
    _, cfgs, models, ens = setup
    steps = 5
    answerer = EnsembleAnswerer(cfgs, batch_size=2, max_new_tokens=steps)
    records = [_record(2, 0.45), _record(3, 0.3), _record(4, 0.55)]
    answers = answerer.alm_answers(ens, records)
    llm = models[0].llm
    batches = [records[:2], records[2:] * 2]   # the answerer's batches (the last one filled with its first row)
    tokens = [_member_tokens(answerer, models, group) for group in batches]
    prompts = [_hand_built(answerer, models, rec, tokens[k // 2], k % 2)[3] for k, rec in enumerate(records)]
    width = max(len(p) for p in prompts) + steps
    forward = jax.jit(lambda x: llm(inputs_embeds=x)[0])   # causal: the zeros after position t change nothing
    for prompt, got in zip(prompts, answers):
        x = jnp.zeros((1, width, prompt.shape[-1]), prompt.dtype).at[0, :len(prompt)].set(prompt)
        t, want = len(prompt), []
        for _ in range(steps):
            token = int(jnp.argmax(forward(x)[t - 1]))
            want.append(token)
            if token == answerer.eos_id:
                break
            x, t = x.at[0, t].set(llm.embed(jnp.asarray([token], jnp.int32))[0]), t + 1
        assert got.ids == tuple(want)


def test_members_on_another_llm_or_with_lora_are_refused(setup, tiny_llm_dir, tmp_path):
    from alm_jax.evaluation.ensemble import AlarmEnsemble, EnsembleAnswerer
    from alm_jax.weights.alm_params import build_alm
    paths, cfgs, models, _ = setup
    other = _member_cfg(paths, tmp_path, "batch", f"model.llm={tiny_llm_dir}")
    with pytest.raises(ConfigError, match="model.llm=.*join checkpoints trained on the same LLM"):
        EnsembleAnswerer([cfgs[0], other])
    with pytest.raises(ConfigError, match="another LLM than member 0"):
        AlarmEnsemble([models[0], build_alm(other.model)])
    twin = build_alm(cfgs[0].model, seed=3)    # same LLM directory, weights changed
    emb = twin.llm.embed_tokens.embedding
    emb.set_value(emb[...].at[0, 0].add(1e-3))
    with pytest.raises(ConfigError, match="weights differ"):
        AlarmEnsemble([models[0], twin])
    lora = _member_cfg(paths, tmp_path, "batch", "model.lora.rank=2")
    with pytest.raises(ConfigError, match="LoRA"):
        EnsembleAnswerer([cfgs[0], lora])
    with pytest.raises(ConfigError, match="LoRA"):
        AlarmEnsemble([models[0], build_alm(lora.model)])


def test_one_member_several_clips_and_other_suites_are_refused(setup, capsys):
    """N = 1 is refused (ALARM's list path with one model is not the plain model): use the checkpoint alone."""
    from alm_jax.cli import main
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation.ensemble import AlarmEnsemble, EnsembleAnswerer, ensemble_suite
    _, cfgs, models, ens = setup
    with pytest.raises(ConfigError, match="at least two"):
        AlarmEnsemble([models[0]])
    with pytest.raises(ConfigError, match="at least two"):
        EnsembleAnswerer([cfgs[0]])
    answerer = EnsembleAnswerer(cfgs, batch_size=1)
    with pytest.raises(ConfigError, match="one clip"):
        answerer._prompt_batch([_record(5, 0.3, n_clips=2)])
    with pytest.raises(ConfigError, match="multiple-choice"):
        ensemble_suite(cfgs, SuiteConfig(name="hallucination"))
    with pytest.raises(ConfigError, match="AlarmEnsemble"):
        answerer.alm_answers(models[0], [_record(5, 0.3)])
    assert main(["eval", "runs/a", "--ensemble", "alarm_e", "--suite", "mmsu"]) == 1
    assert "two or more checkpoints" in capsys.readouterr().err
    assert main(["eval", "runs/a", "runs/b", "--ensemble", "alarm_e", "--suite", "loss"]) == 1
    assert "--suite loss" in capsys.readouterr().err


def test_a_multiple_choice_suite_runs_on_the_ensemble(setup, tmp_path):
    """`ensemble_suite` (what `alm eval --ensemble alarm_e` runs): MMAU items answered by the ensemble."""
    import soundfile as sf

    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation.ensemble import EnsembleAnswerer, ensemble_suite
    _, cfgs, _, ens = setup
    items = []
    for i in range(3):
        wave = _record(10 + i, 0.4).clips[0].decode(target_sr=SR)
        sf.write(tmp_path / f"c{i}.wav", wave, SR)
        items.append({"id": f"c{i}", "audio_id": f"./c{i}.wav", "question": "What is it?",
                      "choices": ["tone", "speech"], "answer": "tone", "task": "sound", "difficulty": "easy",
                      "sub-category": "x"})
    (tmp_path / "items.json").write_text(json.dumps(items))
    suite = ensemble_suite(cfgs, SuiteConfig(name="mmau", data=str(tmp_path / "items.json"), batch_size=2,
                                             max_new_tokens=3))
    assert isinstance(suite.answerer, EnsembleAnswerer)
    metrics = suite.run(ens)
    assert metrics["eval/mmau/scored"] + metrics["eval/mmau/skipped"] == 3
    assert len(suite.details["items"]) + metrics["eval/mmau/skipped"] == 3
