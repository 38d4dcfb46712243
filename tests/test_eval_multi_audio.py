"""The MAE-style multi-audio suite (alm_jax/evaluation/multi_audio.py): exact answers by construction, answer
reading, and the report (accuracy, backbone agreement, no-audio baseline) on a tiny ALM with two clip slots."""

import json
import re

import numpy as np
import pytest

from tiny_setup import tiny_config


def test_read_choice():
    from alm_jax.evaluation.multi_audio import read_choice
    assert read_choice("Audio 2.") == "2" and read_choice("The first one") == "1"
    assert read_choice("It is clip 1, not audio 2") == "1" and read_choice("2") == "2"
    assert read_choice("Neither") is None and read_choice("The second audio is longer") == "2"
    # a per-clip listing chooses nothing (the frozen SmolLM2's habit: 'Audio 1:\n\nAudio 2:')
    assert read_choice('Audio 1: "Calm"\nAudio 2: "Calm') is None and read_choice(" audio 2: a bell") is None
    assert read_choice("Audio 2 is louder.\nAudio 1: quiet") == "2" and read_choice("Answer: Audio 1") == "1"


def _suite(tiny, run_dir, seconds, clips):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), run_dir, "data.max_clips=2",
                      f"data.max_audio_seconds={seconds}")
    return EVALUATORS["multi_audio"].build(cfg, SuiteConfig(name="multi_audio", clips=clips, seed=5, batch_size=8,
                                                            max_new_tokens=4)), cfg


def test_answers_are_right_by_construction(tiny, tmp_path):
    suite, _ = _suite(tiny, tmp_path, 3.0, 16)   # 3 s per slot so that durations can differ by a second (no model run)
    tasks = [it["task"] for it in suite.items]
    assert set(tasks) == set(suite.tasks) and len(suite.items) + suite.skipped == 16
    for it, rec in zip(suite.items, suite.records):
        first, second = (c.decode() for c in rec.clips)
        pick = {"1": 0, "2": 1}.get(it["expected"])
        if it["task"] == "contains":
            label = re.search(r"a sound of (.+), Audio 1", it["question"]).group(1)
            assert label in it["labels"][pick] and label not in it["labels"][1 - pick]
            if label != "speech":
                assert f"Audio category: {label}," in it["seeds"][pick] and label not in it["seeds"][1 - pick]
        elif it["task"] == "longer":
            durations = [first.size, second.size]
            assert durations[pick] - durations[1 - pick] >= 16000 * 1.0 - 1
        elif it["task"] == "louder":
            rms = [np.sqrt(np.mean(first ** 2)), np.sqrt(np.mean(second ** 2))]
            assert 20 * np.log10(rms[pick] / rms[1 - pick]) == pytest.approx(10.0, abs=0.05)
        else:
            said = [re.search(r"\] (.+?) \(", s).group(1) for s in it["seeds"]]
            assert (said[0] == said[1]) == (it["expected"] == "yes")


def test_report_on_a_tiny_alm(tiny, tmp_path):
    from alm_jax.weights.alm_params import build_alm
    suite, cfg = _suite(tiny, tmp_path, 1.0, 12)   # the tiny Whisper hears at most 1 s
    m = suite.run(build_alm(cfg.model, seed=cfg.seed))
    rows = suite.details["items"]
    assert m["eval/multi_audio/items"] == len(rows) == len(suite.items)
    for key, who in (("accuracy", "alm"), ("accuracy_backbone_text", "backbone_text"), ("accuracy_no_audio", "no_audio")):
        assert m[f"eval/multi_audio/{key}"] == pytest.approx(100 * sum(r["read"][who] == r["expected"] for r in rows) / len(rows))
    agree = [r["read"]["alm"] is not None and r["read"]["alm"] == r["read"]["backbone_text"] for r in rows]
    assert m["eval/multi_audio/agreement"] == pytest.approx(100 * sum(agree) / len(rows))
    assert m["eval/multi_audio/unreadable"] == pytest.approx(100 * sum(r["read"]["alm"] is None for r in rows) / len(rows))
    assert {k.split("/")[-1] for k in m if "/task/" in k} <= set(suite.tasks)
    assert suite.reference.load is None   # its text answers are cached, the backbone dropped


def test_needs_two_clip_slots(tiny, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.errors import ConfigError
    from alm_jax.evaluation import EVALUATORS
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path)
    with pytest.raises(ConfigError, match="data.max_clips >= 2"):
        EVALUATORS["multi_audio"].build(cfg, SuiteConfig(name="multi_audio"))
