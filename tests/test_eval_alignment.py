"""The alignment suite (alm_jax/evaluation/alignment.py): label read-out, held-out sound-event clips, and the
agreement / no-audio baseline arithmetic on a tiny ALM."""

import json

import pytest

from tiny_setup import tiny_config


def test_read_label():
    from alm_jax.evaluation.alignment import read_label
    labels = ["dog bark", "siren", "high beep", "clock ticking", "water drip"]
    assert read_label("I hear a siren.", labels) == "siren"
    assert read_label("Dogs barking, then a siren", labels) == "dog bark"      # suffixes, the first named wins
    assert read_label("The main sound is a HIGH-BEEP", labels) == "high beep"  # hyphen-joined
    assert read_label("water dripping from a tap", labels) == "water drip"
    assert read_label("a clock", labels) is None and read_label("", labels) is None
    assert read_label("sirens", labels) == "siren" and read_label("asiren", labels) is None   # whole words


def test_read_label_by_noun():
    from alm_jax.audio.synth import EVENT_LABELS, EVENT_NOUNS
    from alm_jax.evaluation.alignment import read_label
    labels = list(EVENT_LABELS)
    assert set(EVENT_NOUNS.values()) <= set(labels) and "beep" not in EVENT_NOUNS and "noise" not in EVENT_NOUNS
    read = lambda text: read_label(text, labels, EVENT_NOUNS)
    assert read("The main sound in this audio clip is a clock.") == "clock ticking"   # read as None without nouns
    assert read("a barking dog") == "dog bark" and read("a gentle stream of water") == "water drip"
    assert read("Birds and a drum") == "bird chirp"                   # plural; the first named wins
    assert read("a waterfall") is None and read("a drummer") is None   # never inside a longer word
    assert read("a bird chirp") == "bird chirp" and read("a high beep, then a bell") == "high beep"
    assert read("a beep") is None and read("a gentle voice") is None  # a shared noun names no class
    assert read_label("a clock", labels) is None                       # nouns only where given
    assert read_label("a dog", ["siren"], EVENT_NOUNS) is None         # ... and only for the labels asked about


def test_suite_on_a_tiny_alm(tiny, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    from alm_jax.evaluation.alignment import QUESTION
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path)
    suite = EVALUATORS["alignment"].build(cfg, SuiteConfig(name="alignment", clips=6, seed=3, batch_size=4,
                                                           max_new_tokens=4))
    assert len(suite.items) + suite.skipped == 6 and suite.items
    assert all(set(it["labels"]) <= set(suite.vocabulary) and "speech" not in it["labels"] for it in suite.items)
    m = suite.run(build_alm(cfg.model, seed=cfg.seed))
    rows = suite.details["items"]
    assert m["eval/alignment/items"] == len(rows)
    agree = lambda who: 100 * sum(r["read"][who] is not None and r["read"][who] == r["read"]["backbone_text"]
                                  for r in rows) / len(rows)
    assert m["eval/alignment/agreement"] == pytest.approx(agree("alm"))
    assert m["eval/alignment/baseline"] == pytest.approx(agree("no_audio"))
    for key, who in (("accuracy", "alm"), ("accuracy_backbone_text", "backbone_text"), ("accuracy_no_audio", "no_audio")):
        assert m[f"eval/alignment/{key}"] == pytest.approx(100 * sum(r["read"][who] in r["labels"] for r in rows) / len(rows))
    for r, chat in zip(rows, suite.reference.chats):   # the backbone reads the seed description, as recipes ask
        assert r["seed"] in chat[1]["content"] and QUESTION in chat[1]["content"]
        assert "Answer as someone who has listened" in chat[1]["content"]
    assert suite.reference.load is None

    # an ALM naming one class for every clip: agreement no better than the best constant answer, one class named
    n = len(rows)
    backbone = ["A siren wails."] + ["A bell rings."] * (n - 1)
    suite.reference.compare = lambda *args: iter(zip(["It is a siren."] * n, backbone, ["Nothing."] * n))
    m = suite.run(None)
    assert m["eval/alignment/agreement"] == pytest.approx(100 / n) and m["eval/alignment/baseline"] == 0
    assert m["eval/alignment/constant_baseline"] == pytest.approx(100 * max(1, n - 1) / n)
    assert m["eval/alignment/distinct_alm"] == 1
