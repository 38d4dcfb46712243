"""`alm generate` reads every source kind it names: a JSONL manifest and a TFDS directory become random-access
`(meta, waveform)` sources (`data/sources/random_access.py`); records carry the source's own audio."""

import json

import numpy as np
import pytest
import soundfile as sf
from test_generate_command import _tagged_answer
from test_sources import _build_tfds, _mapping
from tiny_setup import ScriptedBackbone

from alm_jax.data.corpus import Corpus

SR = 16000


def _manifest(tmp_path, n=3):
    lines = []
    for i in range(n):
        t = np.arange(int(SR * (0.5 + 0.25 * i))) / SR
        sf.write(tmp_path / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32), SR)
        lines.append({"path": f"c{i}.wav", "id": f"c{i}", "caption": f"a tone number {i}", "labels": ["tone"],
                      "transcript": f"tone {i}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path / "m.jsonl"


def _records_match_source(out, source):
    records = list(Corpus(out))
    assert len(records) == len(source)
    by_id = {source[i][0].clip_id: source[i][1] for i in range(len(source))}
    for r in records:
        clip = r.clips[0]
        wave = clip.decode(target_sr=SR, mono=True)
        ref = by_id[clip.meta.clip_id] if clip.meta is not None else None
        assert ref is not None and wave.shape == ref.shape and np.abs(wave - ref).max() < 1e-3
    return records


def test_jsonl_and_tfds_sources_feed_the_engine(tiny_llm_dir, tmp_path):
    from alm_jax.generation.engine import ResponseGenerator, generate_corpus
    from alm_jax.generation.run import build_source
    from alm_jax.recipes import build_recipe
    from alm_jax.data.sources.random_access import RandomAccessWaveforms
    from alm_jax.data.sources.tfds_dir import TfdsDirSource
    jsonl = build_source(str(_manifest(tmp_path)), 3, {})
    assert len(jsonl) == 3 and jsonl[1][1].dtype == np.float32 and jsonl[1][1].ndim == 1
    tfds_src = RandomAccessWaveforms(TfdsDirSource(_build_tfds(tmp_path / "tfds"), "train", _mapping(sample_rate=SR)))
    assert len(tfds_src) == 4 and tfds_src[0][1].ndim == 1
    for name, source in (("jsonl", jsonl), ("tfds", tfds_src)):
        gen = ScriptedBackbone(ResponseGenerator(tiny_llm_dir, batch_size=4, max_new_tokens=8, max_prompt_tokens=2048),
                               _tagged_answer)
        generate_corpus(tmp_path / name, source, build_recipe("desta", seed=1), gen, n_records=len(source),
                        records_per_shard=2)
        _records_match_source(tmp_path / name, source)
    with pytest.raises(IndexError):
        jsonl[3]


def test_alm_generate_from_a_jsonl_manifest(tiny_llm_dir, tmp_path):
    from alm_jax.cli import main
    manifest = _manifest(tmp_path)
    assert main(["generate", "--recipe", "desta", "--source", str(manifest), "--llm", str(tiny_llm_dir), "--out",
                 str(tmp_path / "out"), "--n", "3", "--batch-size", "4", "--max-new-tokens", "4",
                 "--max-prompt-tokens", "512"]) == 0
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert report["items"] == 3 and report["records_kept"] + sum(report["filtered"].values()) == 3
