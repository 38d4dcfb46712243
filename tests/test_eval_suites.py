"""Multiple-choice benchmark suites on a tiny ALM (alm_jax/evaluation/benchmarks.py): prompts, the report
schema, and numbers that agree with the items and with the scorer."""

import json

import numpy as np
import pytest
import soundfile as sf

from tiny_setup import tiny_config

SR = 16000


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path_factory.mktemp("run"))
    return cfg, build_alm(cfg.model, seed=cfg.seed)


def _write_wavs(root, names, seconds=0.5):
    for i, name in enumerate(names):
        t = np.arange(int(SR * seconds)) / SR
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.3 * np.sin(2 * np.pi * (220 + 60 * i) * t)).astype(np.float32), SR)


def _mmau_items():
    rows = [("sound", "easy", "Counting", ["1", "2", "3", "4"], "2"),
            ("sound", "hard", "Acoustic Source Inference", ["Man", "Woman", "Child", "Robot"], "Robot"),
            ("music", "medium", "Instrumentation", ["Piano", "Violin", "Drums", "Flute"], "Piano"),
            ("speech", "medium", "Emotion Flip Detection", ["Happy", "Sad"], "Sad"),
            ("speech", "easy", "Counting", ["one", "two", "three", "four"], "three")]
    return [{"id": f"id-{i}", "audio_id": f"./test-mini-audios/id-{i}.wav", "question": f"Question {i}?",
             "choices": ch, "answer": a, "dataset": "synthetic", "task": task, "split": "test-mini",
             "category": "Reasoning", "sub-category": sub, "difficulty": diff}
            for i, (task, diff, sub, ch, a) in enumerate(rows)]


def test_desta_prompt_is_theirs():
    from alm_jax.evaluation.benchmarks import desta_messages, quoted_options
    assert quoted_options(["a", "b", "c", "d"]) == '"a", "b", "c" or "d"'
    assert quoted_options(["a", "b"]) == '"a" or "b"' and quoted_options(["a"]) == '"a"'
    system, user = desta_messages("What is heard?", ["Dog", "Cat"])
    assert system["content"] == 'Focus on the audio clips and instructions. Put your answer in the format "The correct answer is: "___" ".'
    assert user["content"] == ('<start_audio><audio><end_audio>\n\nWhat is heard? Choose from the following options: '
                               '"Dog" or "Cat"')


def test_mmau_suite_report_is_consistent(setup, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    from alm_jax.evaluation.multiple_choice import score
    cfg, model = setup
    items = _mmau_items()
    _write_wavs(tmp_path, [it["audio_id"][2:] for it in items])
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(items))
    suite = EVALUATORS["mmau"].build(cfg, SuiteConfig(name="mmau", data=str(tmp_path / "mmau-test-mini.json"),
                                                      batch_size=2, max_new_tokens=6))
    seen = []
    suite.progress = lambda done, total: seen.append((done, total))
    metrics = suite.run(model)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    report = suite.details
    assert report["scored"] == 5 and report["prompt"] == "desta" and report["rule"] == "official"
    matches = [it["match"] for it in report["items"]]
    assert set(matches) <= {0, 1}
    assert metrics["eval/mmau/accuracy"] == pytest.approx(100 * sum(matches) / 5) == report["accuracy"]
    assert metrics["eval/mmau/scored"] == 5 and metrics["eval/mmau/skipped"] == 0
    assert {k for k in metrics if k.startswith("eval/mmau/task/")} == {"eval/mmau/task/sound", "eval/mmau/task/music",
                                                                      "eval/mmau/task/speech"}
    for it in report["items"]:
        assert it["model_output"] == it["raw_output"].replace("The correct answer is: ", "").strip()
    for task in ("sound", "music", "speech"):
        rows = [it["match"] for it in report["items"] if it["task"] == task]
        assert metrics[f"eval/mmau/task/{task}"] == pytest.approx(100 * sum(rows) / len(rows))
    assert all(isinstance(v, float) for v in metrics.values())
    # the saved items reproduce the report through the scorer alone (what `alm eval score` does)
    again = score("mmau", [{k: v for k, v in it.items() if k != "match"} for it in report["items"]])
    assert again["accuracy"] == report["accuracy"] and again["by_subcategory"] == report["by_subcategory"]
    # a second run of the same model gives the same answers (greedy, static shapes)
    first = [it["raw_output"] for it in report["items"]]
    suite.run(model)
    assert [it["raw_output"] for it in suite.details["items"]] == first


def test_mmsu_official_prompt_and_mmar(setup, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    cfg, model = setup
    mmsu = [{"id": i, "audio_path": f"/audio/q{i}.wav", "question": "Which emotion?", "choice_a": "happy",
             "choice_b": "sad", "choice_c": "angry", "choice_d": "calm", "answer_gt": "sad", "task_name": "emotion",
             "category": "perception", "sub-category": "paralinguistics"} for i in range(3)]
    _write_wavs(tmp_path, [f"audio/q{i}.flac" for i in range(3)])   # found through the extension fallback
    (tmp_path / "mmsu.jsonl").write_text("\n".join(json.dumps(x) for x in mmsu))
    suite = EVALUATORS["mmsu"].build(cfg, SuiteConfig(name="mmsu", data=str(tmp_path / "mmsu.jsonl"),
                                                      prompt="official", max_new_tokens=4))
    assert "Choose the most suitable answer from options A, B, C, and D." in suite.messages(mmsu[0])[1]["content"]
    assert "\nA. happy\nB. sad\nC. angry\nD. calm" in suite.messages(mmsu[0])[1]["content"]
    answers = suite.answer_all(model)   # the real generation path: three strings from the tiny model
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    suite.answer_all = lambda _: ["B", "sad", "Answer: C"]   # scoring of the suite, with known answers
    m = suite.run(model)
    assert (m["eval/mmsu/scored"], m["eval/mmsu/skipped"], m["eval/mmsu/accuracy"]) == (2, 1, 50.0)
    assert suite.details["rule"] == "official" and m["eval/mmsu/subcategory/perception/paralinguistics"] == 50.0
    mmar = [{"id": "a", "audio_path": "./audio/q0.flac", "question": "Q?", "choices": ["x", "y"], "answer": "x",
             "modality": "sound", "category": "Signal Layer", "sub-category": "Pitch"}]
    (tmp_path / "MMAR-meta.jsonl").write_text(json.dumps(mmar[0]) + "\n")
    suite = EVALUATORS["mmar"].build(cfg, SuiteConfig(name="mmar", data=str(tmp_path / "MMAR-meta.jsonl"),
                                                      prompt="plain", max_new_tokens=4))
    m = suite.run(model)
    assert set(m) == {"eval/mmar/accuracy", "eval/mmar/scored", "eval/mmar/skipped", "eval/mmar/task/sound",
                      "eval/mmar/category/Signal Layer", "eval/mmar/subcategory/Pitch"}
    assert "answer_prediction" in suite.details["items"][0]


def test_suite_errors(setup, tmp_path):
    from alm_jax.config import SuiteConfig
    from alm_jax.errors import ConfigError, DataError
    from alm_jax.evaluation import EVALUATORS, build_evaluators
    cfg, _ = setup
    with pytest.raises(ConfigError, match="give the benchmark's items file"):
        EVALUATORS["mmau"].build(cfg, SuiteConfig(name="mmau"))
    (tmp_path / "m.json").write_text(json.dumps(_mmau_items()))
    with pytest.raises(DataError, match="5 of 5 audio files are missing"):
        EVALUATORS["mmau"].build(cfg, SuiteConfig(name="mmau", data=str(tmp_path / "m.json")))
    with pytest.raises(ConfigError, match="has no official prompt"):
        EVALUATORS["mmau"].build(cfg, SuiteConfig(name="mmau", data=str(tmp_path / "m.json"), prompt="official"))
    import dataclasses
    ev = dataclasses.replace(cfg.eval, every=5, evaluators=("loss",),
                             suites=(SuiteConfig(name="mmau", data=str(tmp_path / "m.json")),))
    with pytest.raises(ConfigError, match=r"configures \['mmau'\] but eval.evaluators"):
        build_evaluators(dataclasses.replace(cfg, eval=ev))
    ev = dataclasses.replace(ev, suites=(SuiteConfig(name="bleu"),))
    with pytest.raises(ConfigError, match=r"eval.suites.0.name='bleu'"):
        build_evaluators(dataclasses.replace(cfg, eval=ev))
