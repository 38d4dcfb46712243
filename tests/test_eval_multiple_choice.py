"""The MMAU / MMSU / MMAR scorers against the official rules (alm_jax/evaluation/multiple_choice.py).

Each verdict below is what the official script decides for the case, worked out from its code
(`Sakshi113/MMAU:evaluation.py::string_match`, `dingdongwang/MMSU:mmsu_evaluation.py`); the comment says why.
"""

import json
import subprocess
import sys

import pytest

from alm_jax.errors import ConfigError, DataError
from alm_jax.evaluation.multiple_choice import load_items, score, string_match, tokens

SPEAKER = ["Man", "Woman", "Child", "Robot"]
ARTICLES = ["A child", "A woman", "An adult man", "A teenager"]
DOGS = ["Dog barking", "Cat meowing", "Dog growling", "Bird chirping"]
PIANOS = ["Piano", "Grand piano", "Violin", "Guitar"]
COUNTS = ["3", "4", "5", "6"]

# (answer, choices, prediction, official verdict, why)
MMAU_CASES = [
    ("Man", SPEAKER, "Man", True, "exact"),
    ("Man", SPEAKER, "man", True, "case is ignored"),
    ("Man", SPEAKER, "MAN.", True, "punctuation is ignored"),
    ("Man", SPEAKER, "The answer is Man", True, "extra words in no choice are allowed"),
    ("Man", SPEAKER, "Woman", False, "'man' inside 'woman' is not the token 'man'"),
    ("Man", SPEAKER, "Man or Woman", False, "the answer plus a wrong choice"),
    ("Man", SPEAKER, "", False, "empty output"),
    ("Man", SPEAKER, "   \n ", False, "whitespace only: no token"),
    ("Man", SPEAKER, "...", False, "punctuation only: no token"),
    ("Man", SPEAKER, "Man, definitely not a robot", False, "a wrong choice's word, even negated"),
    ("Man", SPEAKER, "A man is speaking", True, "'a', 'is', 'speaking' are in no choice"),
    ("Man", SPEAKER, "not man", True, "negation is not understood"),
    ("Man", SPEAKER, "Man\n\nExplanation: the voice is deep", True, "explanation words in no choice"),
    ("Man", SPEAKER, "Child or Robot", False, "two wrong choices"),
    ("A woman", ARTICLES, "A woman", True, "exact"),
    ("A woman", ARTICLES, "woman", False, "the answer's 'a' is missing"),
    ("A woman", ARTICLES, "The speaker is a woman.", True, "all answer tokens, none wrong"),
    ("A woman", ARTICLES, "a woman, not an adult man", False, "'an', 'adult', 'man' belong to a wrong choice"),
    ("A woman", ARTICLES, 'The correct answer is: "A woman"', True, "DeSTA's answer format"),
    ("A woman", ARTICLES, "A WOMAN", True, "case"),
    ("A woman", ARTICLES, "a child", False, "'child' is wrong, 'woman' missing"),
    ("Dog growling", DOGS, "Dog growling", True, "exact"),
    ("Dog growling", DOGS, "A dog is growling", True, "'dog' is shared with a wrong choice but is an answer word"),
    ("Dog growling", DOGS, "growling", False, "'dog' missing"),
    ("Dog growling", DOGS, "Dog barking and growling", False, "'barking' is a wrong-choice word"),
    ("Dog growling", DOGS, "dog-growling", True, "the hyphen splits tokens"),
    ("Piano", PIANOS, "Piano", True, "exact"),
    ("Piano", PIANOS, "Grand piano", False, "a choice containing the answer: 'grand' is wrong"),
    ("Grand piano", PIANOS, "Piano", False, "the answer's 'grand' is missing"),
    ("Grand piano", PIANOS, "grand piano", True, "'piano' is not a wrong word (it is in the answer)"),
    ("Yes", ["Yes", "yes.", "No", "Maybe"], "yes", True, "a choice with the answer's token set is not wrong"),
    ("Yes", ["Yes", "No", "Maybe", "Unsure"], "Yes, maybe", False, "'maybe' is wrong"),
    ("4", COUNTS, "4", True, "digits are tokens"),
    ("4", COUNTS, "There are 4 dogs", True, "extra words"),
    ("4", COUNTS, "4 or 5", False, "a wrong number"),
    ("4", COUNTS, "four", False, "numbers are not spelled out"),
    ("4", COUNTS, "44", False, "'44' is not '4'"),
    ("4", COUNTS, "3.4", False, "'3' and '4' are separate tokens; '3' is wrong"),
    ("Café music", ["Café music", "Bar music", "Club music", "Street music"], "CAFÉ MUSIC", True,
     "Unicode letters lower-case and match"),
    ("dog_bark", ["dog_bark", "cat_meow"], "dog bark", False, "'_' is a word character: 'dog_bark' is one token"),
    ("Boy", ["Man", "Woman"], "boy", True, "an answer outside the choices still matches its own text"),
    ("?", ["?", "Dog"], "cat", True, "an answer without tokens: only the wrong-word condition counts"),
    ("Rain", ["Rain", "Heavy rain", "Snow", "Hail"], "heavy rain", False, "'heavy' is a wrong-choice word"),
]

LETTER_ITEM = {"choice_a": "happy", "choice_b": "sad", "choice_c": "angry", "choice_d": "neutral",
               "answer_gt": "sad"}
# (response or MISSING, official outcome: 1 right, 0 wrong, "skip" left out, why)
MISSING = object()
MMSU_CASES = [
    ("B", 1, "the first character is the letter"),
    ("B. sad", 1, "first character"),
    ("  \nB\n", 1, "stripped"),
    ("The answer is B.", 1, "second to last character"),
    ("(B)", 1, "second to last character"),
    ("b", "skip", "lower-case letters are not read: wrong format, left out"),
    ("The answer is B", "skip", "second to last is a space: wrong format"),
    ("sad", "skip", "the choice text is not read"),
    ("Answer: B", 0, "the first character 'A' is read as the letter A"),
    ("A sad voice", 0, "first character 'A'"),
    ("C", 0, "a wrong letter"),
    ("D)", 0, "first character 'D'"),
    ("", 0, "empty: no prediction, counted wrong"),
    ("None", 0, "the string None: counted wrong"),
    (MISSING, 0, "no response key: read as '' and counted wrong"),
    (None, "skip", "null: .strip() fails, the script skips the item"),
    (3, "skip", "not a string: skipped"),
]


@pytest.mark.parametrize("answer, choices, prediction, verdict, why", MMAU_CASES,
                         ids=[f"{i}-{c[4][:30]}" for i, c in enumerate(MMAU_CASES)])
def test_string_match_agrees_with_the_official_rule(answer, choices, prediction, verdict, why):
    assert string_match(answer, prediction, choices) is verdict, why


def test_fixture_is_large_enough():
    assert len(MMAU_CASES) >= 30 and len(MMSU_CASES) >= 15


def test_tokens():
    assert tokens("The Dog-growling, 3.4 dog_bark!") == {"the", "dog", "growling", "3", "4", "dog_bark"}


@pytest.mark.parametrize("benchmark, key", [("mmau", "model_output"), ("mmar", "answer_prediction")])
def test_score_uses_the_rule_and_the_official_key(benchmark, key):
    items = [{"id": i, "answer": a, "choices": c, key: p, "task": "sound", "modality": "sound",
              "difficulty": "easy", "category": "Signal Layer"} for i, (a, c, p, _, _) in enumerate(MMAU_CASES)]
    report = score(benchmark, items)
    assert [it["match"] for it in report["items"]] == [int(v) for _, _, _, v, _ in MMAU_CASES]
    assert report["accuracy"] == pytest.approx(100 * sum(v for *_, v, _ in MMAU_CASES) / len(MMAU_CASES))


@pytest.mark.parametrize("response, outcome, why", MMSU_CASES, ids=[c[2][:30] for c in MMSU_CASES])
def test_mmsu_letter_rule(response, outcome, why):
    item = dict(LETTER_ITEM, category="perception", **({} if response is MISSING else {"response": response}))
    helper = dict(LETTER_ITEM, response="B")   # one scorable item so that a skipped case still gives a report
    report = score("mmsu", [helper, item])
    if outcome == "skip":
        assert report["scored"] == 1 and sum(report["skipped"].values()) == 1, why
    else:
        assert report["scored"] == 2 and report["items"][1]["match"] == outcome, why


def test_mmsu_string_match_rule_reads_choice_texts():
    items = [dict(LETTER_ITEM, response='The correct answer is: "sad"'), dict(LETTER_ITEM, response="angry")]
    assert [it["match"] for it in score("mmsu", items, rule="string_match")["items"]] == [1, 0]
    with pytest.raises(DataError, match="none of the 2 mmsu items"):   # officially both have no letter: skipped
        score("mmsu", items)


# ---- reports over files in the published layouts

def _mmau(i, task, difficulty, sub, answer, output, **extra):
    item = {"id": f"mini-{i}", "audio_id": f"./test-mini-audios/mini-{i}.wav", "question": f"Question {i}?",
            "choices": ["Man", "Woman", "Child", "Robot"], "answer": answer, "dataset": "AudioSet", "task": task,
            "split": "test-mini", "category": "Reasoning", "sub-category": sub, "difficulty": difficulty, **extra}
    if output is not None:
        item["model_output"] = output
    return item


def test_report_over_a_test_mini_layout_file(tmp_path):
    items = [
        _mmau(0, "sound", "easy", "Acoustic Source Inference", "Man", "Man"),            # 1
        _mmau(1, "sound", "easy", "Acoustic Source Inference", "Woman", "Man"),          # 0
        _mmau(2, "sound", "hard", "Counting", "Child", "The answer is child."),          # 1
        _mmau(3, "music", "medium", "Instrumentation", "Robot", "robot"),                # 1
        _mmau(4, "music", "medium", "Instrumentation", "Robot", ""),                     # 0
        _mmau(5, "music", "hard", "Counting", "Man", "Man or woman"),                    # 0
        _mmau(6, "speech", "medium", "Emotion Flip Detection", "Woman", "woman"),        # 1
        _mmau(7, "speech", "easy", "Emotion Flip Detection", "Child", None),             # skipped: no model_output
        _mmau(8, "speech", "hard", "Counting", "Child", "CHILD!"),                       # 1
    ]
    path = tmp_path / "mmau-test-mini-predictions.json"
    path.write_text(json.dumps(items, indent=1))
    report = score("mmau", load_items(path))
    assert report["scored"] == 8 and report["correct"] == 5 and report["skipped"] == {"no_output": 1}
    assert report["accuracy"] == pytest.approx(62.5)
    assert report["by_task"] == pytest.approx({"sound": 200 / 3, "music": 100 / 3, "speech": 100.0})
    assert report["by_difficulty"] == pytest.approx({"easy": 50.0, "hard": 200 / 3, "medium": 200 / 3})
    assert report["by_subcategory"] == pytest.approx({"Acoustic Source Inference": 50.0, "Counting": 200 / 3,
                                                      "Instrumentation": 50.0, "Emotion Flip Detection": 100.0})
    assert report["counts"]["by_task"] == {"sound": 3, "music": 3, "speech": 2}
    assert [it["id"] for it in report["items"]] == [f"mini-{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8)]
    assert [it["match"] for it in report["items"]] == [1, 0, 1, 1, 0, 0, 1, 1]
    # consistency: each grouping's count-weighted mean is the overall accuracy
    for g in ("by_task", "by_difficulty", "by_subcategory"):
        n = report["counts"][g]
        assert sum(report[g][k] * n[k] for k in n) / sum(n.values()) == pytest.approx(report["accuracy"])


def test_mmsu_and_mmar_jsonl_layouts(tmp_path):
    mmsu = [dict(LETTER_ITEM, id=i, task_name="emotion_recognition", category=c, **{"sub-category": s}, response=r)
            for i, (c, s, r) in enumerate([("perception", "paralinguistics", "B"), ("perception", "paralinguistics", "A"),
                                           ("reasoning", "paralinguistics", "B."), ("reasoning", "semantics", "xyz")])]
    (tmp_path / "mmsu.jsonl").write_text("\n".join(json.dumps(x) for x in mmsu) + "\n")
    r = score("mmsu", load_items(tmp_path / "mmsu.jsonl"))
    assert (r["scored"], r["correct"], r["skipped"]) == (3, 2, {"wrong_format": 1})
    assert r["by_category"] == pytest.approx({"perception": 50.0, "reasoning": 100.0})
    assert r["by_subcategory"] == pytest.approx({"perception/paralinguistics": 50.0, "reasoning/paralinguistics": 100.0})
    assert r["by_task"] == pytest.approx({"emotion_recognition": 200 / 3})
    mmar = [{"id": f"m{i}", "audio_path": f"./audio/m{i}.wav", "question": "Q?", "choices": SPEAKER, "answer": a,
             "modality": m, "category": "Perception Layer", "sub-category": "Speaker", "language": None,
             "answer_prediction": p} for i, (m, a, p) in enumerate([("speech", "Man", "man"), ("mix-sound-speech", "Robot", "a child")])]
    (tmp_path / "mmar.jsonl").write_text("\n".join(json.dumps(x) for x in mmar))
    r = score("mmar", load_items(tmp_path / "mmar.jsonl"))
    assert r["accuracy"] == 50.0 and r["by_modality"] == {"speech": 100.0, "mix-sound-speech": 0.0}
    assert r["by_task"] == r["by_modality"] and r["by_category"] == {"Perception Layer": 50.0}


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        score("mmlu", [])
    with pytest.raises(DataError, match="evaluation.py reads `model_output`"):
        score("mmau", [{"answer": "Man", "choices": SPEAKER, "model_prediction": "Man", "task": "sound"}])
    assert score("mmau", [{"answer": "Man", "choices": SPEAKER, "model_prediction": "Man", "task": "sound"}],
                 key="model_prediction")["accuracy"] == 100.0
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_items(tmp_path / "bad.jsonl")


def test_alm_eval_score_command(tmp_path):
    items = [_mmau(0, "sound", "easy", "Counting", "Man", "Man"), _mmau(1, "music", "hard", "Counting", "Child", "robot")]
    (tmp_path / "p.json").write_text(json.dumps(items))
    out = subprocess.run([sys.executable, "-m", "alm_jax.cli", "eval", "score", "--benchmark", "mmau", "--predictions",
                          str(tmp_path / "p.json"), "--out", str(tmp_path / "r" / "report.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["accuracy"] == 50.0 and report["by_task"] == {"sound": 100.0, "music": 0.0}
    assert "50.00%" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "alm_jax.cli", "eval", "score", "--predictions", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--benchmark" in bad.stderr


def test_a_suite_details_file_rescores_with_its_recorded_rule(tmp_path):
    from alm_jax.cli import main
    from alm_jax.evaluation.multiple_choice import details_settings
    items = [{"id": str(i), "question": "Gender?", "choice_a": "male", "choice_b": "female", "choice_c": "child",
              "choice_d": "robot", "answer_gt": gt, "category": "perception", "sub-category": "para",
              "task_name": "gender", "response": f'The correct answer is: "{said}"'}
             for i, (gt, said) in enumerate([("male", "male"), ("female", "male"), ("female", "female")])]
    details = tmp_path / "0-run.json"
    details.write_text(json.dumps({"checkpoint": "runs/x", "benchmark": "mmsu", "rule": "string_match",
                                   "key": "response", "accuracy": 66.7, "items": items}))
    assert details_settings(details) == {"rule": "string_match", "key": "response"}
    assert main(["eval", "score", "--benchmark", "mmsu", "--predictions", str(details), "--out",
                 str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["rule"] == "string_match" and r["scored"] == 3 and abs(r["accuracy"] - 200 / 3) < 1e-9
    # the official letter rule, asked for explicitly, skips these free-text answers (as the official script does)
    assert main(["eval", "score", "--benchmark", "mmsu", "--predictions", str(details), "--rule", "official"]) == 1
