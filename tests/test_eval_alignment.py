"""The alignment suite (alm_jax/evaluation/alignment.py): options built right by construction, answer reading,
and agreement / no-audio baseline arithmetic on a tiny ALM."""

import json

import pytest

from tiny_setup import tiny_config


def test_read_option():
    from alm_jax.evaluation.alignment import read_option
    opts = ["dog bark", "siren", "high beep", "beep"]
    assert read_option("I hear a siren.", opts) == "siren"
    assert read_option("The dog bark comes first, then a siren", opts) == "dog bark"   # the first named wins
    assert read_option("A HIGH BEEP", opts) == "high beep"        # the longer option at the same place
    assert read_option("beeps and sirens", opts) is None          # whole words only
    assert read_option("Nothing at all", opts) is None and read_option("", opts) is None


def test_options_are_one_present_and_absent_others():
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.evaluation.alignment import options_for
    from alm_jax.recipes.cooccurrence import Cooccurrence
    source = DemoSource(seed=4, n_clips=60, max_duration=3.0)
    co = Cooccurrence.from_source(source)
    firsts, kept = set(), 0
    for i in range(len(source)):
        meta, _ = source[i]
        drawn = options_for(meta.labels, co.absent_labels(meta), i, 4, 4)
        if drawn is None:
            continue
        kept += 1
        answer, options = drawn
        assert len(set(options)) == 4 and answer in options and answer in meta.labels
        assert all(o not in meta.labels and o not in co.excluded(meta) for o in options if o != answer)
        assert options_for(meta.labels, co.absent_labels(meta), i, 4, 4) == drawn   # keyed by (seed, index)
        firsts.add(options.index(answer))
    assert kept > 50 and firsts == {0, 1, 2, 3}   # the answer's position is drawn, not fixed
    assert options_for([], ["a", "b", "c"], 0, 4, 4) is None and options_for(["x"], ["a", "b"], 0, 4, 4) is None


def test_suite_on_a_tiny_alm(tiny, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path)
    suite = EVALUATORS["alignment"].build(cfg, SuiteConfig(name="alignment", clips=6, seed=3, batch_size=4,
                                                           max_new_tokens=4))
    assert len(suite.items) + suite.skipped == 6 and suite.items
    m = suite.run(build_alm(cfg.model, seed=cfg.seed))
    rows = suite.details["items"]
    assert m["eval/alignment/items"] == len(rows)
    agree = lambda who: 100 * sum(r["read"][who] is not None and r["read"][who] == r["read"]["backbone_text"]
                                  for r in rows) / len(rows)
    assert m["eval/alignment/agreement"] == pytest.approx(agree("alm"))
    assert m["eval/alignment/baseline"] == pytest.approx(agree("no_audio"))
    for key, who in (("accuracy", "alm"), ("accuracy_backbone_text", "backbone_text"), ("accuracy_no_audio", "no_audio")):
        assert m[f"eval/alignment/{key}"] == pytest.approx(100 * sum(r["read"][who] == r["expected"] for r in rows) / len(rows))
    for r, chat in zip(rows, suite.reference.chats):
        assert r["seed"] in chat[1]["content"] and r["question"] in chat[1]["content"]
        assert r["question"].count(",") == 2 and " or " in r["question"]
