"""The Grain pipeline: static shapes, loss mask and spans, resume, process sharding, nested subsets,
bad data skipped and counted."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from alm_jax.data.corpus import Corpus, write_corpus
from alm_jax.data.pipeline import (AudioSpec, PipelineConfig, SampleBuilder, make_dataset,
                                   nested_subset_indices)
from alm_jax.data.records import AUDIO_PLACEHOLDER, AudioClip, Record
from alm_jax.data.templates import ChatTokenizer
from alm_jax.errors import DataError

SR = 16000


def tokens_for_samples(n: int) -> int:
    """A variable-length connector rule for the tests: one token per 0.1 s, at least one."""
    return max(1, n // 1600)


def make_record(i: int, n_clips: int = 1) -> Record:
    r = np.random.default_rng(i)
    clips = [AudioClip.from_wave((0.1 * r.standard_normal(int(SR * (0.5 + 0.1 * ((i + c) % 7))))).astype(np.float32), SR)
             for c in range(n_clips)]
    user = " and ".join([AUDIO_PLACEHOLDER] * n_clips) + f" What is clip {i}?"
    return Record(clips=clips, messages=[{"role": "user", "content": user},
                                         {"role": "assistant", "content": f"It is number {i}."}], recipe="test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, make_record, 40, 10)
    return Corpus(d)


def spec(pad=None):
    return AudioSpec(tokens_for_samples=tokens_for_samples, max_audio_tokens=12, pad_to_seconds=pad, max_seconds=1.2)


def builder(tok, pad=None, seq_len=64, max_clips=1):
    return SampleBuilder(ChatTokenizer(tok), spec(pad), seq_len, max_clips)


def first_batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_batch_shapes_mask_and_spans(corpus, demo_tokenizer):
    cfg = PipelineConfig(batch_size=4, seq_len=64)
    (b,), _ = first_batches(make_dataset([corpus.source], builder(demo_tokenizer), cfg), 1)
    assert b["input_ids"].shape == b["targets"].shape == b["loss_mask"].shape == b["audio_slot"].shape == (4, 64)
    assert b["audio"].shape == (4, int(1.2 * SR)) and b["audio_samples"].shape == (4,)
    eos = demo_tokenizer.eos_token_id
    for row in range(4):
        slots = b["audio_slot"][row]
        n_audio = int((slots >= 0).sum())
        assert n_audio == tokens_for_samples(int(b["audio_samples"][row]))      # exact span length
        span = np.flatnonzero(slots >= 0)
        assert np.all(np.diff(span) == 1)                                        # one contiguous span
        assert np.array_equal(slots[span], row * 12 + np.arange(n_audio))        # flat slot indices
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
        slots = b["audio_slot"][row]
        for c in range(3):
            flat = row * 3 + c
            in_clip = (slots >= flat * 12) & (slots < (flat + 1) * 12)
            assert in_clip.sum() == tokens_for_samples(int(b["audio_samples"][flat]))


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
        return r
    write_corpus(tmp_path, rec, 20, 20)
    return Corpus(tmp_path)


@pytest.mark.parametrize("bad_kind", ["undecodable", "too_long", "truncated"])
def test_bad_samples_are_skipped_and_counted(tmp_path, demo_tokenizer, bad_kind):
    c = _bad_corpus(tmp_path, bad_kind)
    cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=1, shuffle=False, bad_fraction_limit=0.5, bad_min_seen=10)
    it = iter(make_dataset([c.source], builder(demo_tokenizer), cfg))
    batches = list(it)
    assert len(batches) == 4  # 16 good samples
    bad = it.bad.to_dict()
    assert bad["bad_total"] == 4 and bad["seen"] == 20


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path, demo_tokenizer):
    c = _bad_corpus(tmp_path, "undecodable")
    cfg = PipelineConfig(batch_size=4, seq_len=64, epochs=1, shuffle=False, bad_fraction_limit=0.01, bad_min_seen=5)
    with pytest.raises(DataError, match="data.bad_fraction_limit"):
        list(make_dataset([c.source], builder(demo_tokenizer), cfg))
