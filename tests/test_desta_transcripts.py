"""DeSTA2.5's transcript tokens: each clip's span is `[audio tokens] + [its transcript's LLM token ids]` (cut to
`model.connector.transcript_tokens`, " " without speech); the splice matches DeSTA's (`BertEncoder` Q-Former +
`_prepare_inputs_for_llm`, in torch); over-long samples are truncated and counted, not dropped; a tiny DeSTA
trains on a corpus its recipe wrote; at inference, Whisper writes the transcripts behind the voice-activity gate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer

from alm_jax.config import ConnectorConfig, EncoderConfig
from alm_jax.data.corpus import Corpus, write_corpus
from alm_jax.data.pipeline import TRUNCATED, AudioSpec, PipelineConfig, SampleBuilder, collate_prompts, make_dataset
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record
from alm_jax.data.templates import ChatTokenizer
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.models.connectors import load_bert_qformer_weights
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.testing.torch_desta import DestaConnector, desta_layout, desta_splice, desta_transcript_ids

SR = 16000
N_AUDIO = 4          # Q-Former queries (audio tokens per clip) of the tiny configs
# The training test's tiny LLM: width, std of its blocks' and embedding weights, std of its output rows (only the
# answers' tokens have one), large enough that a frozen random LLM can be steered to peaked answers.
LLM_WIDTH, LLM_STD, EMB_STD, HEAD_STD = 64, 0.1, 0.1, 3.0
ANSWERS = ("Yes", "No")          # the scripted answers of its corpus (speech clip, other clip)


def _wave(seed: int, seconds: float = 0.6) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * (180 + 60 * seed) * t) + 0.05 * r.standard_normal(t.size)).astype(np.float32)


def _record(seed: int, transcripts, answer: str = "It is a tone.", n_clips: int = 1) -> Record:
    audio = " and ".join([f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>"] * n_clips)
    user = f"{audio}\nWhat is it?"
    meta = {} if transcripts is None else {"transcripts": transcripts}
    return Record(clips=[AudioClip.from_wave(_wave(seed + c), SR) for c in range(n_clips)],
                  messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                  metadata=meta, recipe="desta")


def _builder(tok, transcript_tokens: int, seq_len: int = 96, max_clips: int = 2, rule=lambda n: N_AUDIO):
    spec = AudioSpec(tokens_for_samples=rule, pad_to_seconds=None, max_seconds=1.2, transcript_tokens=transcript_tokens)
    return SampleBuilder(ChatTokenizer(tok), spec, seq_len, max_clips)


def _runs(clip: np.ndarray) -> list[tuple[int, int, int]]:
    """(clip, start, length) of each run of audio positions in a row."""
    out, t = [], 0
    while t < len(clip):
        if clip[t] >= 0:
            s = t
            while t < len(clip) and clip[t] == clip[s]:
                t += 1
            out.append((int(clip[s]), s, t - s))
        else:
            t += 1
    return out


# ---------------------------------------------------------------------------------------------- layout


def test_each_clip_span_is_audio_tokens_then_its_cut_transcript(demo_tokenizer):
    rec = _record(1, ["hello there my good friend", ""], n_clips=2)
    enc = lambda text: demo_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    s = _builder(demo_tokenizer, transcript_tokens=3).build(rec)
    ids, clip, pos = s["input_ids"], s["audio_clip"], s["audio_pos"]
    assert TRUNCATED not in s
    runs = _runs(clip)
    assert [(c, n) for c, _, n in runs] == [(0, N_AUDIO), (1, N_AUDIO)]
    for c, start, n in runs:
        assert pos[start:start + n].tolist() == list(range(N_AUDIO))
    (_, a, _), (_, b, _) = runs
    assert ids[a + N_AUDIO:a + N_AUDIO + 3].tolist() == enc("hello there my good friend")[:3]   # cut to 3 tokens
    assert (clip[a + N_AUDIO:a + N_AUDIO + 3] == -1).all()                                  # text positions
    assert ids[b + N_AUDIO:b + N_AUDIO + 1].tolist() == enc(" ")                            # no speech: " "
    assert demo_tokenizer.decode(ids[b + N_AUDIO + 1:b + N_AUDIO + 8]).startswith("<end_audio>")
    # off: the same sample without the transcript tokens; no "transcripts" key: " " for every clip
    off = _builder(demo_tokenizer, transcript_tokens=0).build(rec)
    assert off["attention_mask"].sum() == s["attention_mask"].sum() - 3 - 1
    none = _builder(demo_tokenizer, transcript_tokens=3).build(_record(1, None, n_clips=2))
    assert none["attention_mask"].sum() == off["attention_mask"].sum() + 2
    bad = _builder(demo_tokenizer, transcript_tokens=3)(_record(1, ["only one"], n_clips=2).to_bytes())
    assert bad["__bad__"] == "bad_record" and "transcripts" in bad["detail"]


def test_over_long_samples_are_truncated_and_counted_not_dropped(tmp_path, demo_tokenizer):
    long_answer = " ".join(f"word{i}" for i in range(60))

    def rec(i):
        if i % 4 == 3:          # the prompt alone fills the row: nothing to learn is left, dropped as too_long
            return _record(i, ["a very long transcript " * 30], answer="Fine.")
        return _record(i, ["short speech"], answer=long_answer if i % 2 else "A tone.")
    write_corpus(tmp_path, rec, 8, 8)
    seq_len = 64
    builder = _builder(demo_tokenizer, transcript_tokens=100, seq_len=seq_len, max_clips=1)
    cfg = PipelineConfig(batch_size=2, seq_len=seq_len, epochs=1, shuffle=False, bad_fraction_limit=0.5, bad_min_seen=4)
    it = iter(make_dataset([Corpus(tmp_path).source], builder, cfg))
    batches = list(it)
    report = it.bad.to_dict()
    assert report["bad"] == {"too_long": 2} and report["adjusted"] == {"truncated": 2} and report["seen"] == 8
    assert sum(b["input_ids"].shape[0] for b in batches) == 6
    full = builder.tok.encode(rec(1).messages, [N_AUDIO], builder.transcript_ids(rec(1)))
    row = batches[0]["input_ids"][1]                             # record 1, cut to its first seq_len + 1 tokens
    assert len(full) > seq_len + 1 and batches[0]["attention_mask"][1].all()
    np.testing.assert_array_equal(row, full.ids[:seq_len])
    np.testing.assert_array_equal(batches[0]["targets"][1], full.ids[1:seq_len + 1])
    np.testing.assert_array_equal(batches[0]["loss_mask"][1], full.loss_mask[1:seq_len + 1])
    # the count survives the iterator's checkpoint state
    state = it.get_state()
    assert state["bad"]["adjusted"] == {"truncated": 2}


# ---------------------------------------------------------------------------------------------- torch parity


@nnx.jit(static_argnums=(0, 1))   # one compiled initialization instead of one per parameter
def _tiny_desta(transcript_tokens: int, vocab: int):
    """A tiny DeSTA ALM: random Whisper encoder (2 blocks, d 32), Q-Former (2 layers, 4 queries), LLM (vocab of
    the demo tokenizer, width 48)."""
    enc = WhisperEncoder(WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                              encoder_ffn_dim=64, max_source_positions=100), rngs=nnx.Rngs(1))
    llm = DecoderLM(LLMConfig.from_hf({"model_type": "llama", "vocab_size": vocab, "hidden_size": 48,
                                       "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "max_position_embeddings": 512,
                                       "tie_word_embeddings": True}), rngs=nnx.Rngs(2))
    cc = ConnectorConfig(kind="desta", num_queries=N_AUDIO, num_layers=2, num_heads=4, hidden=32, intermediate=64,
                         transcript_tokens=transcript_tokens)
    ecfg = EncoderConfig(taps=(0, 1), tap_indexing="blocks", pad_to_seconds=None)
    return AudioLanguageModel([enc], llm, cc, [ecfg], rngs=nnx.Rngs(3))


def test_desta_connector_with_transcripts_matches_torch_bert_encoder_and_desta_splice(demo_tokenizer):
    """Same weights, dropout off: our pipeline rows + `embed_inputs` equal DeSTA's layout (each `<|AUDIO|>` ->
    audio + transcript placeholders, left padding) and `_prepare_inputs_for_llm` on a torch `BertEncoder`
    Q-Former, for a batch of a two-clip and a one-clip prompt, transcripts cut to 5 tokens."""
    cap = 5
    model = _tiny_desta(cap, len(demo_tokenizer))
    torch.manual_seed(0)
    ref = DestaConnector(n_taps=2, n_queries=N_AUDIO, hidden=32, heads=4, intermediate=64, layers=2, llm_dim=48,
                         random_layer_weights=True, layernorm_noise=0.1).eval()
    load_bert_qformer_weights(model.connector.net, ref.state_dict())
    records = [_record(3, ["the quick brown fox jumps over the lazy dog", ""], n_clips=2),
               _record(7, ["one two"], n_clips=1)]
    prompts = [Record(clips=r.clips, messages=r.messages[:1], metadata=r.metadata) for r in records]
    builder = _builder(demo_tokenizer, cap, rule=model.token_rule)
    batch = collate_prompts(builder, prompts)

    # DeSTA's side: its own tokenization of the rendered prompt with an added locator token
    tok = AutoTokenizer.from_pretrained(demo_tokenizer.name_or_path)
    tok.add_tokens([AUDIO_PLACEHOLDER])
    locator = tok.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    placeholder, pad = builder.tok.placeholder_id, builder.tok.pad_id
    rows, starts, transcripts = [], [], []
    for r in prompts:
        text = tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
        trans = [desta_transcript_ids(tok, t if t.strip() else " ", max_tokens=cap) for t in r.metadata["transcripts"]]
        ids, st = desta_layout(tok(text, add_special_tokens=False)["input_ids"], locator, [N_AUDIO] * len(trans),
                               [len(t) for t in trans], placeholder)
        rows.append(ids)
        starts.append(st)
        transcripts += trans
    width = max(map(len, rows))
    assert width == batch["input_ids"].shape[1]
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows])      # left padding, as DeSTA's
    positions = [(b, width - len(rows[b]) + s) for b in range(len(rows)) for s in starts[b]]
    assert len(transcripts[0]) == cap and len(transcripts[1]) == 1              # cut; " " for no speech
    # DeSTA's placeholders after the audio tokens stand for the transcript; ours hold its ids (the LLM embeds them)
    ours = batch["input_ids"].copy()
    for (b, start), trans in zip(positions, transcripts):
        np.testing.assert_array_equal(ours[b, start + N_AUDIO:start + N_AUDIO + len(trans)], trans)
        ours[b, start + N_AUDIO:start + N_AUDIO + len(trans)] = placeholder
    np.testing.assert_array_equal(ours, input_ids.numpy())

    clip_rows = [b * 2 + c for b, r in enumerate(prompts) for c in range(len(r.clips))]   # C = 2 slots per row
    states, got = nnx.jit(lambda m, b: (m.encoder_states(0, b["audio"], None, b["audio_samples"]), m.embed_inputs(b)))(
        model, {k: jnp.asarray(v) for k, v in batch.items()})
    with torch.no_grad():
        feats = ref([torch.from_numpy(np.array(states[t])) for t in (0, 1)])[clip_rows]
        embed = torch.nn.Embedding.from_pretrained(torch.from_numpy(np.array(model.llm.embed_tokens.embedding[...])))
        want = desta_splice(embed, input_ids, feats, transcripts, positions).numpy()
    got = np.asarray(got)
    assert got.shape == want.shape
    print(f"\n  DeSTA splice with transcripts vs torch: max |diff| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-4
    audio_rows = batch["audio_clip"] >= 0
    assert np.abs(got[audio_rows]).max() > 0.1 and audio_rows.sum() == 3 * N_AUDIO   # the Q-Former tokens compared


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def desta_setup(tmp_path_factory, demo_models):
    """Tiny LLM (SmolLM2 tokenizer, weights as `LLM_*`) + tiny Whisper (3.2 s window) dirs and a corpus the DeSTA
    recipe wrote (8 records of demo speech and sound clips, scripted answers)."""
    from tiny_setup import ScriptedBackbone, write_steerable_llm, write_tiny_whisper

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus
    from alm_jax.recipes.desta import DestaRecipe
    root = tmp_path_factory.mktemp("desta")
    llm, whisper = root / "llm", root / "whisper"
    write_steerable_llm(llm, demo_models.llm, ANSWERS, LLM_WIDTH, LLM_STD, EMB_STD, HEAD_STD)
    write_tiny_whisper(whisper, 160)
    source = DemoSource(seed=4, n_clips=8, kinds=("speech", "events"), min_duration=0.5, max_duration=1.0)
    # scripted answers (no model): `ANSWERS[0]` when the seed description holds speech (a speaker's attributes)
    gen = ScriptedBackbone(ResponseGenerator(llm, batch_size=8, max_new_tokens=8, max_prompt_tokens=2048),
                           lambda prompt: ANSWERS[0] if "Gender" in prompt else ANSWERS[1])
    generate_corpus(root / "corpus", source, DestaRecipe(seed=1), gen, n_records=8, records_per_shard=8)
    return {"llm": str(llm), "whisper": str(whisper), "corpus": str(root / "corpus")}


def test_desta_trains_with_transcripts_from_its_recipe_corpus_and_overfits_a_batch(desta_setup, tmp_path):
    from tiny_setup import tiny_config

    from alm_jax.training.trainer import train
    records = list(Corpus(desta_setup["corpus"]))
    spoken = [r.metadata["transcripts"][0] for r in records if "transcripts" in r.metadata]
    assert len(records) == 8 and 2 <= len(spoken) < 8
    steps = 12                  # batch 8 = the whole corpus: every step trains on the same 8 samples
    cfg = tiny_config(desta_setup, tmp_path, "model.connector.transcript_tokens=100", "data.max_text_tokens=96",
                      "data.max_audio_seconds=3.2", "data.batch_size=8", "optim.lr=0.1", f"steps={steps}",
                      f"optim.total_steps={steps}", f"checkpoint.every={steps}", "logging.every=0")
    seen = []
    result = train(cfg, batch_transform=lambda step, b: seen.append(b["input_ids"]) or b)
    assert result.step == steps and result.bad_samples["bad"] == {} and result.bad_samples["adjusted"] == {}
    hf = AutoTokenizer.from_pretrained(desta_setup["llm"])
    rows = [r.tolist() for r in seen[0]]
    for text in spoken:                                         # every speech clip's transcript is in the batch
        ids = hf.encode(text, add_special_tokens=False)
        assert any(any(row[i:i + len(ids)] == ids for i in range(len(row))) for row in rows), text
    losses = [result.losses[k] for k in sorted(result.losses)]
    print(f"\n  DeSTA tiny with transcripts: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")
    assert losses[0] > 5 and losses[-1] < 0.2


# ---------------------------------------------------------------------------------------------- inference


@pytest.mark.slow
def test_inference_transcripts_come_from_whisper_behind_the_voice_activity_gate(desta_setup, demo_models, tmp_path,
                                                                                monkeypatch):
    """The inference path (`Answerer.alm`): a speech clip is transcribed by the Whisper (tiny.en) whose encoder feeds
    the connector, a steady tone gets " ", given transcripts are kept; the prompts the ALM answers carry them after
    the audio tokens."""
    from tiny_setup import tiny_config

    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.evaluation import answering
    from alm_jax.evaluation.answering import Answerer
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(desta_setup, tmp_path, f"model.encoders.0.path={demo_models.whisper}",
                      "model.encoders.0.pad_to_seconds=30.0", "model.connector.transcript_tokens=100")
    meta, speech = DemoSource(seed=4, n_clips=8, kinds=("speech",), min_duration=0.5, max_duration=1.0)[1]   # gated in
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
    prompt = [{"role": "user", "content": f"<start_audio>{AUDIO_PLACEHOLDER}<end_audio>\nWhat is it?"}]
    records = [Record(clips=[AudioClip.from_wave(w, SR)], messages=prompt) for w in (speech, tone)]
    records.append(Record(clips=[AudioClip.from_wave(tone, SR)], messages=prompt, metadata={"transcripts": ["given"]}))
    model = build_alm(cfg.model)
    answerer = Answerer(cfg, batch_size=3, max_new_tokens=2)
    done = answerer.with_transcripts(model, records)
    heard, silent, given = (r.metadata["transcripts"][0] for r in done)
    print(f"\n  tiny.en transcript: {heard!r}; spoken: {meta.transcript!r}")
    assert any(w.lower().strip(".,!?") in heard.lower() for w in meta.transcript.split()) and heard == heard.strip()
    assert silent == " " and given == "given"
    batches = []       # what the ALM is asked to answer (the LLM's decoding itself is tested elsewhere)
    monkeypatch.setattr(answering, "generate", lambda m, b, **kw: batches.append(b) or jnp.zeros((3, 2), jnp.int32))
    assert len(answerer.alm(model, records)) == 3 and len(batches) == 1
    batch = {k: np.asarray(v) for k, v in batches[0].items()}
    llm_tok = AutoTokenizer.from_pretrained(desta_setup["llm"])
    for b, text in enumerate((heard, " ", "given")):
        last = int(np.nonzero(batch["audio_clip"][b] >= 0)[0][-1])   # the clip's last audio token
        ids = llm_tok.encode(text, add_special_tokens=False)
        assert batch["input_ids"][b, last + 1:last + 1 + len(ids)].tolist() == ids
