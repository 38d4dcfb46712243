"""The BALSa-style hallucination suite (alm_jax/evaluation/hallucination.py): balanced by construction, absent
labels really absent, the metrics' arithmetic, and the report on a tiny ALM."""

import json

import pytest

from tiny_setup import tiny_config


def test_questions_are_balanced_and_correct_over_many_clips():
    from alm_jax.data.sources.demo import DemoSource
    from alm_jax.evaluation.hallucination import questions_for
    from alm_jax.recipes.cooccurrence import Cooccurrence
    source = DemoSource(seed=7, n_clips=150, max_duration=3.0)
    co = Cooccurrence.from_source(source)
    yes = no = skipped = 0
    seen_backgrounds = set()
    for i in range(len(source)):
        meta, _ = source[i]
        qs = questions_for(meta, i, 7, co)
        if qs is None:
            skipped += 1
            continue
        assert [q["expected"] for q in qs] == ["yes", "no"]
        assert qs[0]["label"] in meta.labels
        assert qs[1]["label"] not in meta.labels and qs[1]["label"] in meta.label_vocabulary
        background = meta.attributes["background"]
        seen_backgrounds.add(background)
        masked = {"white noise": "white noise", "pink noise": "pink noise", "hum": "engine hum"}.get(background)
        assert qs[1]["label"] != masked        # a sound the background makes is never asked as absent
        assert all(q["question"].endswith("Answer yes or no.") and q["label"] in q["question"] for q in qs)
        assert questions_for(meta, i, 7, co) == qs   # depends on (seed, index) only
        yes, no = yes + 1, no + 1
    assert yes == no and yes + skipped == 150 and yes > 140
    assert {"white noise", "pink noise", "hum"} <= seen_backgrounds


def test_read_yes_no():
    from alm_jax.evaluation.hallucination import read_yes_no
    assert read_yes_no("Yes, a dog barks.") == "yes" and read_yes_no("No.") == "no"
    assert read_yes_no("I think the answer is no, there is none") == "no"
    assert read_yes_no("There is a siren; yes") == "yes" and read_yes_no("Nothing known") is None
    assert read_yes_no("") is None and read_yes_no("Yesterday no") == "no"


def test_metrics_arithmetic():
    from alm_jax.evaluation.hallucination import yes_no_metrics
    expected = ["yes", "no"] * 4
    answers = ["yes", "yes", "yes", "no", "no", "no", None, "no"]   # 1 hallucination, 1 miss, 1 unparsed
    m = yes_no_metrics(expected, answers)
    # said no: positions 3, 4, 5, 7 (4), of which truly no: 3, 5, 7 (3); actual no: 4
    assert m["accuracy"] == pytest.approx(100 * 5 / 8)
    assert m["precision_no"] == pytest.approx(75.0) and m["recall_no"] == pytest.approx(75.0)
    assert m["f1_no"] == pytest.approx(75.0)
    assert m["yes_rate"] == pytest.approx(100 * 3 / 8) and m["unparsed_rate"] == pytest.approx(12.5)
    assert yes_no_metrics(["yes", "no"], ["yes", "yes"])["f1_no"] == 0.0   # says yes to everything


def test_accuracy_by_kind_separates_speech_from_events():
    from alm_jax.evaluation.hallucination import by_kind
    qs = [{"label": "speech", "expected": "yes"}, {"label": "bell", "expected": "no"},
          {"label": "siren", "expected": "yes"}, {"label": "speech", "expected": "no"}]
    m = by_kind(qs, ["yes", "yes", "yes", None])   # speech: 1 of 2 right, events: 1 of 2 right
    assert m == {"speech_accuracy": 50.0, "events_accuracy": 50.0}
    assert by_kind(qs[1:3], ["no", "no"]) == {"events_accuracy": 50.0}   # no speech question: no speech metric


def test_suite_on_a_tiny_alm(tiny, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(json.loads((tiny / "paths.json").read_text()), tmp_path)
    suite = EVALUATORS["hallucination"].build(cfg, SuiteConfig(name="hallucination", clips=5, seed=3, batch_size=4,
                                                               max_new_tokens=4))
    assert len(suite.records) == len(suite.questions) == 2 * (5 - suite.skipped_clips)
    assert all(r.clips[0].duration <= 0.6 + 1e-9 for r in suite.records)   # cropped to the run's audio buffer
    m = suite.run(build_alm(cfg.model, seed=cfg.seed))
    names = {"accuracy", "precision_no", "recall_no", "f1_no", "yes_rate", "unparsed_rate", "questions", "skipped_clips",
             "backbone_text_accuracy", "no_audio_accuracy"}
    kinds = {f"eval/hallucination/{k}" for k in ("speech_accuracy", "events_accuracy")}
    assert set(m) - kinds == {f"eval/hallucination/{k}" for k in names} and set(m) & kinds   # by kind, when asked
    items = suite.details["items"]
    assert m["eval/hallucination/questions"] == len(items)
    assert m["eval/hallucination/accuracy"] == pytest.approx(100 * sum(i["read"] == i["expected"] for i in items) / len(items))
    assert m["eval/hallucination/yes_rate"] + m["eval/hallucination/unparsed_rate"] == pytest.approx(
        100 * sum(i["read"] != "no" for i in items) / len(items))
    assert sum(i["expected"] == "yes" for i in items) * 2 == len(items)
    for who in ("backbone_text", "no_audio"):   # the references, on the same questions
        assert m[f"eval/hallucination/{who}_accuracy"] == pytest.approx(
            100 * sum(i[f"read_{who}"] == i["expected"] for i in items) / len(items))
    assert all(i["seed"] and i["seed"] in suite.reference.chats[k][1]["content"] for k, i in enumerate(items))
    assert suite.reference.load is None   # the backbone's answers are cached, the backbone dropped
