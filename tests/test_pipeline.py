"""The Grain pipeline: static shapes, loss mask and spans, resume, process sharding, nested subsets,
mixtures, epochs, bad data skipped and counted by kind, and the host log-mel option."""

import collections
import io
import json
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from alm_jax.audio.features import log_mel, log_mel_numpy
from alm_jax.data.corpus import Corpus, write_corpus
from alm_jax.data.pipeline import (AudioSpec, PipelineConfig, SampleBuilder, collate, collate_prompts,
                                   make_dataset, nested_subset_indices)
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record
from alm_jax.data.templates import ChatTokenizer
from alm_jax.errors import ConfigError, DataError

SR = 16000


def tokens_for_samples(n: int) -> int:
    """A variable-length connector rule for the tests: one token per 0.1 s, at least one."""
    return max(1, n // 1600)


def make_record(i: int, n_clips: int = 1, question: str = "What is clip") -> Record:
    r = np.random.default_rng(i)
    clips = [AudioClip.from_wave((0.1 * r.standard_normal(int(SR * (0.5 + 0.1 * ((i + c) % 7))))).astype(np.float32), SR)
             for c in range(n_clips)]
    user = " and ".join([AUDIO_PLACEHOLDER] * n_clips) + f" {question} {i}?"
    return Record(clips=clips, messages=[{"role": "user", "content": user},
                                         {"role": "assistant", "content": f"It is number {i}."}], recipe="test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, make_record, 40, 10)
    return Corpus(d)


def spec(pad=None):
    return AudioSpec(tokens_for_samples=tokens_for_samples, pad_to_seconds=pad, max_seconds=1.2)


def builder(tok, pad=None, seq_len=64, max_clips=1, **kw):
    return SampleBuilder(ChatTokenizer(tok), spec(pad), seq_len, max_clips, **kw)


def questions(batch, tok):
    """(question, record number) of every row, read back from the tokens."""
    out = []
    for r in batch["input_ids"]:
        m = re.search(r"(What is clip|Which sound is) (\d+)\?", tok.decode(r[r != tok.pad_token_id]))
        out.append((m.group(1), int(m.group(2))))
    return out


def first_batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_batch_shapes_mask_and_spans(corpus, demo_tokenizer):
    cfg = PipelineConfig(batch_size=4, seq_len=64)
    (b,), _ = first_batches(make_dataset([corpus.source], builder(demo_tokenizer), cfg), 1)
    assert b["input_ids"].shape == b["targets"].shape == b["loss_mask"].shape == b["audio_clip"].shape == (4, 64)
    assert b["audio"].shape == (4, int(1.2 * SR)) and b["audio_samples"].shape == (4,)
    eos = demo_tokenizer.eos_token_id
    for row in range(4):
        clip, pos = b["audio_clip"][row], b["audio_pos"][row]
        n_audio = int((clip >= 0).sum())
        assert n_audio == tokens_for_samples(int(b["audio_samples"][row]))      # exact span length
        span = np.flatnonzero(clip >= 0)
        assert np.all(np.diff(span) == 1)                                        # one contiguous span
        assert np.array_equal(clip[span], np.zeros(n_audio)) and np.array_equal(pos[span], np.arange(n_audio))
        assert (pos[clip < 0] == -1).all()                                       # row-local indices
        # the loss covers exactly the assistant answer + EOS
        learned = b["targets"][row][b["loss_mask"][row] > 0]
        assert learned[-1] == eos
        text = demo_tokenizer.decode(learned[:-1])
        assert text.startswith("It is number ") and text.endswith(".")
        assert b["loss_mask"][row][b["attention_mask"][row] == 0].sum() == 0


def test_padded_audio_mode(corpus, demo_tokenizer):
    cfg = PipelineConfig(batch_size=2, seq_len=64)
    (b,), _ = first_batches(make_dataset([corpus.source], builder(demo_tokenizer, pad=1.0), cfg), 1)
    assert b["audio"].shape == (2, SR)
    assert np.all(b["audio_samples"] <= SR)


def test_multi_clip_spans(tmp_path, demo_tokenizer):
    write_corpus(tmp_path, lambda i: make_record(i, n_clips=3), 8, 8)
    cfg = PipelineConfig(batch_size=2, seq_len=96, max_clips=3, shuffle=False)
    (b,), _ = first_batches(make_dataset([Corpus(tmp_path).source], builder(demo_tokenizer, seq_len=96, max_clips=3), cfg), 1)
    assert b["audio"].shape[0] == 6
    for row in range(2):
        clip, pos = b["audio_clip"][row], b["audio_pos"][row]
        for c in range(3):
            n = tokens_for_samples(int(b["audio_samples"][row * 3 + c]))
            assert np.array_equal(pos[clip == c], np.arange(n))                # clip c's whole span, in order


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from transformers import AutoTokenizer
    from alm_jax.data.corpus import Corpus
    from alm_jax.data.pipeline import PipelineConfig, make_dataset, ensure_absl_flags_parsed
    sys.path.insert(0, {tests!r})
    from test_pipeline import builder
    ensure_absl_flags_parsed()
    tok = AutoTokenizer.from_pretrained({tok!r})
    state = json.loads(open({state!r}).read())
    ds = make_dataset([Corpus({corpus!r}).source], builder(tok), PipelineConfig(batch_size=4, seq_len=64, num_workers={workers}))
    it = iter(ds)
    it.set_state(state)
    out = [next(it)["input_ids"].tolist() for _ in range(3)]
    open({out!r}, "w").write(json.dumps(out))
""")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_new_process_equals_uninterrupted(corpus, demo_tokenizer, demo_models, tmp_path, workers):
    from alm_jax.data.pipeline import ensure_absl_flags_parsed
    ensure_absl_flags_parsed()
    cfg = PipelineConfig(batch_size=4, seq_len=64, num_workers=workers)
    ds = make_dataset([corpus.source], builder(demo_tokenizer), cfg)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"].tolist() for _ in range(3)]
    (tmp_path / "state.json").write_text(json.dumps(state))
    script = RESUME_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), tok=str(demo_models.llm),
                                  state=str(tmp_path / "state.json"), corpus=corpus.path, workers=workers,
                                  out=str(tmp_path / "out.json"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text()) == expected


def test_two_processes_get_disjoint_shards_covering_the_epoch(corpus, demo_tokenizer):
    seen = []
    for p in range(2):
        cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=1, process_index=p, process_count=2)
        ids = []
        for b in make_dataset([corpus.source], builder(demo_tokenizer), cfg):
            ids += [demo_tokenizer.decode(r[r != demo_tokenizer.pad_token_id]) for r in b["input_ids"]]
        seen.append(ids)
    nums = [set(int(s.split("What is clip ")[1].split("?")[0]) for s in part) for part in seen]
    assert nums[0].isdisjoint(nums[1])
    assert nums[0] | nums[1] == set(range(40))


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_nested_subsets(seed):
    small = set(nested_subset_indices(1000, 0.1, seed))
    mid = set(nested_subset_indices(1000, 0.2, seed))
    full = set(nested_subset_indices(1000, 1.0, seed))
    assert len(small) == 100 and len(mid) == 200 and len(full) == 1000
    assert small <= mid <= full


def _wav_clip(samples: np.ndarray, subtype: str) -> AudioClip:
    """A WAV clip written with soundfile directly (encode_audio refuses empty or non-finite audio)."""
    buf = io.BytesIO()
    sf.write(buf, samples, SR, format="WAV", subtype=subtype)
    return AudioClip(buf.getvalue(), "pcm16", SR, len(samples) / SR)


def _bad_corpus(tmp_path, bad_kind):
    def rec(i):
        r = make_record(i)
        if i % 5 == 0:
            if bad_kind == "undecodable":
                r.clips[0].data = b"RIFF" + b"\x00" * 100
            elif bad_kind == "too_long":
                r.clips = [AudioClip.from_wave(np.zeros(SR * 3, np.float32), SR)]
            elif bad_kind == "truncated":
                r.clips[0].data = r.clips[0].data[: len(r.clips[0].data) // 3]
            elif bad_kind == "nonfinite":  # a float WAV holding NaN and inf
                wave = 0.1 * np.ones(SR // 2, np.float32)
                wave[100], wave[200] = np.nan, np.inf
                r.clips = [_wav_clip(wave, "FLOAT")]
            elif bad_kind == "empty":  # a valid WAV header with zero frames
                r.clips = [_wav_clip(np.zeros(0, np.float32), "PCM_16")]
        return r
    # check_audio=False: write_corpus now refuses bad clips; this stands for a corpus from an older writer
    write_corpus(tmp_path, rec, 20, 20, check_audio=False)
    return Corpus(tmp_path)


# bad kind in the corpus -> the kind it is counted as (a truncated FLAC stream does not decode)
BAD_KINDS = {"undecodable": "undecodable", "too_long": "too_long", "truncated": "undecodable",
             "nonfinite": "nonfinite", "empty": "empty"}


@pytest.mark.parametrize("bad_kind", sorted(BAD_KINDS))
def test_bad_samples_are_skipped_and_counted(tmp_path, demo_tokenizer, bad_kind):
    c = _bad_corpus(tmp_path, bad_kind)
    cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=1, shuffle=False, bad_fraction_limit=0.5, bad_min_seen=10)
    it = iter(make_dataset([c.source], builder(demo_tokenizer), cfg))
    batches = list(it)
    assert len(batches) == 4  # 16 good samples
    assert sorted(n for b in batches for _, n in questions(b, demo_tokenizer)) == [i for i in range(20) if i % 5]
    bad = it.bad.to_dict()
    assert bad["bad_total"] == 4 and bad["seen"] == 20
    assert bad["bad"] == {BAD_KINDS[bad_kind]: 4}


def test_nonfinite_decode_is_caught_by_the_builder(demo_tokenizer, monkeypatch):
    """Even if a decoder let NaN/inf through, the builder marks the sample `nonfinite`."""
    b = builder(demo_tokenizer)
    raw = make_record(3).to_bytes()
    assert "input_ids" in b(raw)
    monkeypatch.setattr(AudioClip, "decode", lambda self, **kw: np.full(SR // 2, np.nan, np.float32))
    out = b(raw)
    assert out["__bad__"] == "nonfinite"


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path, demo_tokenizer):
    c = _bad_corpus(tmp_path, "undecodable")
    cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=1, shuffle=False, bad_fraction_limit=0.01, bad_min_seen=5)
    with pytest.raises(DataError, match="data.bad_fraction_limit"):
        list(make_dataset([c.source], builder(demo_tokenizer), cfg))


def test_mixture_follows_the_weights_and_keeps_corpora_apart(corpus, tmp_path, demo_tokenizer):
    """Two corpora mixed 3:1: over 300 samples 3/4 come from the first, and every sample (text and
    audio) is a record of the corpus its question names."""
    write_corpus(tmp_path, lambda i: make_record(500 + i, question="Which sound is"), 30, 30)
    other = Corpus(tmp_path)
    cfg = PipelineConfig(batch_size=4, seq_len=64, max_clips=1)
    it = iter(make_dataset([corpus.source, other.source], builder(demo_tokenizer), cfg, weights=[3.0, 1.0]))
    counts = collections.Counter()
    for _ in range(75):
        b = next(it)
        for row, (q, n) in enumerate(questions(b, demo_tokenizer)):
            src, i = (corpus, n) if q == "What is clip" else (other, n - 500)
            assert 0 <= i < len(src)
            wave = src[i].clips[0].decode(target_sr=SR)
            assert b["audio_samples"][row] == wave.size
            assert np.array_equal(b["audio"][row, :wave.size], wave)
            assert not b["audio"][row, wave.size:].any()                          # zero padding
            counts[q] += 1
    assert sum(counts.values()) == 300
    assert abs(counts["What is clip"] / 300 - 0.75) <= 0.02
    with pytest.raises(ConfigError, match="data.weights"):
        make_dataset([corpus.source, other.source], builder(demo_tokenizer), cfg)


@pytest.mark.parametrize("shuffle", [True, False])
def test_epochs_yield_every_record_once_per_epoch(corpus, demo_tokenizer, shuffle):
    """epochs=2 gives each record exactly twice. Documented order: with shuffle on, every epoch is a new
    permutation (Grain reseeds the shuffle per epoch); with shuffle off, every epoch is in record order."""
    cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=2, shuffle=shuffle, seed=3)
    nums = [n for b in make_dataset([corpus.source], builder(demo_tokenizer), cfg) for _, n in questions(b, demo_tokenizer)]
    assert len(nums) == 80 and collections.Counter(nums) == {i: 2 for i in range(40)}
    first, second = nums[:40], nums[40:]
    assert sorted(first) == sorted(second) == list(range(40))  # epochs do not interleave
    if shuffle:
        assert first != second and first != list(range(40))
    else:
        assert first == second == list(range(40))


# ---- host log-mel option

def test_log_mel_numpy_matches_jax():
    r = np.random.default_rng(0)
    S = 2 * SR
    audio = np.zeros((5, S), np.float32)
    valid = [0, 3000, S // 2, S - 150, S]          # empty, short, half, tail inside the reflection, full
    for b, v in enumerate(valid):
        audio[b, :v] = 0.2 * r.standard_normal(v) + 0.3 * np.sin(np.arange(v) * 0.05 * (b + 1))
    for pad in (None, 2.0, 3.0):
        ref = np.asarray(log_mel(jnp.asarray(audio), pad_to_seconds=pad))
        for vs in (None, valid):
            host = log_mel_numpy(audio, pad_to_seconds=pad, valid_samples=vs)
            assert host.shape == ref.shape and host.dtype == np.float32
            assert np.abs(host - ref).max() <= 1e-4, (pad, vs)
    ref = np.asarray(log_mel(jnp.asarray(audio[:2]), n_mels=128, pad_to_seconds=None))
    assert np.abs(log_mel_numpy(audio[:2], n_mels=128, pad_to_seconds=None) - ref).max() <= 1e-4


@pytest.mark.parametrize("pad", [None, 1.0])
def test_host_features_batch_equals_device_log_mel(corpus, demo_tokenizer, pad):
    cfg = PipelineConfig(batch_size=3, seq_len=64)
    (dev,), _ = first_batches(make_dataset([corpus.source], builder(demo_tokenizer, pad=pad), cfg), 1)
    (host,), _ = first_batches(make_dataset([corpus.source], builder(demo_tokenizer, pad=pad, host_features=True), cfg), 1)
    assert "audio" not in host and "audio_features" not in dev
    assert set(host) - {"audio_features"} == set(dev) - {"audio"}
    for k in set(dev) - {"audio"}:
        assert np.array_equal(host[k], dev[k]), k
    frames = int((pad or 1.2) * SR) // 160
    assert host["audio_features"].shape == (3, 80, frames) and host["audio_features"].dtype == np.float32
    ref = np.asarray(log_mel(jnp.asarray(dev["audio"]), pad_to_seconds=pad))
    assert np.abs(host["audio_features"] - ref).max() <= 1e-4


@pytest.mark.parametrize("kind", ["alarm_ca", "desta"])
def test_alm_logits_equal_with_host_or_device_log_mel(demo_tokenizer, kind):
    from test_alm import VOCAB, make_model
    model = make_model(kind)
    audio_spec = AudioSpec(tokens_for_samples=model.token_rule, pad_to_seconds=None, max_seconds=1.2)
    records = [make_record(i, n_clips=2) for i in (1, 4)]
    batches = {}
    for host in (False, True):
        b = SampleBuilder(ChatTokenizer(demo_tokenizer), audio_spec, 160, 2, host_features=host)
        batch = collate([b.build(r) for r in records], audio_spec.buffer_samples)
        batch["input_ids"] = batch["input_ids"] % VOCAB          # the tiny LLM's vocabulary
        batches[host] = {k: jnp.asarray(v) for k, v in batch.items()}
        prompts = collate_prompts(b, records)
        key = "audio_features" if host else "audio"
        assert prompts[key].shape[0] == 4 and np.array_equal(prompts[key], batch[key])
    assert "audio" not in batches[True]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
    dev, host = np.asarray(forward(state, batches[False])), np.asarray(forward(state, batches[True]))
    assert np.isfinite(dev).all() and np.abs(dev - host).max() <= 1e-4
    with pytest.raises(ConfigError, match="n_mels=80"):
        model.audio_tokens(None, batches[True]["audio_samples"], features=batches[True]["audio_features"][:, :64])
