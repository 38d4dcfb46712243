"""The recipe registry (`RECIPES`, `build_recipe`) and the engine protocol of `alm_jax/recipes/__init__.py`,
run end to end for every recipe by a small fake engine with a fake LLM."""

import collections
import dataclasses

import pytest

from alm_jax.data.records import Record
from alm_jax.data.sources.demo import DemoSource
from alm_jax.errors import ConfigError
from alm_jax.recipes import RECIPES, Target, build_recipe, recipe_options


@dataclasses.dataclass
class Out:
    text: str
    n_tokens: int
    finished: bool = True


def fake_llm(messages) -> str:
    """Answers every prompt the same recognisable way; rephrasing prompts get an `<answer>` block."""
    user = messages[-1]["content"]
    if "<ORIGINAL_ANSWER>" in user:
        return "<think>ok</think><answer>\nI hear a short sound and a steady hiss in the background.\n</answer>"
    if "Begin your answer with" in user:     # BALSa yes/no: "no" when the question names a sound hinted absent
        question = user.split("[End of audio]\n", 1)[1].split("\n", 1)[0]
        absent = user.split("include: ", 1)[1].split(".\n", 1)[0].replace(" and ", ", ").split(", ") \
            if "include: " in user else []
        return ("No" if any(label in question for label in absent) else "Yes") + ", I can tell by listening."
    return "I hear a short sound and a steady hiss in the background."


def fake_engine(recipe, source, n):
    """The protocol, step by step: skip / fixed answer / stage 0 + accepts / later stages / finalize / record."""
    filtered, records = collections.Counter(), []
    for i in range(n):
        item = recipe.item_for(i, source)
        if item.skip_reason:
            filtered[item.skip_reason] += 1
            continue
        if item.fixed_response is not None:
            target = Target.keep(item.fixed_response)
        else:
            text = fake_llm(item.generation_messages)
            outputs = [Out(text, len(text.split()))]
            if not recipe.accepts(text):
                filtered["rejected_by_recipe"] += 1
                continue
            for stage in range(1, getattr(recipe, "n_stages", 1)):
                prompt = recipe.stage_prompt(item, stage, outputs)
                text = fake_llm(prompt.messages)
                outputs.append(Out(text, len(text.split())))
            target = recipe.finalize(item, outputs, count_tokens=lambda s: len(s.split()))
        if not target.kept:
            filtered[target.reason] += 1
            continue
        record = item.to_record(target.text, "fake-llm", "pcm16", {"response_tokens": 1, **target.metadata})
        records.append(Record.from_bytes(record.to_bytes()))
    return records, filtered


@pytest.fixture(scope="module")
def source():
    return DemoSource(seed=31, n_clips=8, max_duration=2.5)


@pytest.mark.parametrize("name, options", [
    ("desta", {}), ("balsa", {"yes_no": "1"}), ("balsa_ma", {}),
    ("alarm", {"min_response_tokens": "5", "max_response_tokens": "100"}), ("mallm", {}), ("mats", {})])
def test_every_recipe_runs_through_the_protocol(source, name, options):
    recipe = build_recipe(name, seed="2", **options)
    assert recipe.seed == 2 and recipe.recipe_id == name
    records, filtered = fake_engine(recipe, source, 8)
    assert len(records) + sum(filtered.values()) == 8
    assert len(records) >= 6, filtered
    for record in records:
        assert record.recipe == name and record.messages[-1]["role"] == "assistant"
        n_audio = sum(m["content"].count("<audio>") for m in record.messages)
        assert n_audio == len(record.clips) == {"balsa_ma": len(record.clips), "mallm": 2, "mats": 0}.get(name, 1)
    if name == "alarm":
        assert records[0].messages[-1]["content"] == "I hear a short sound and a steady hiss in the background."
        assert records[0].metadata["target_tokens"] == 12
    if name == "balsa":
        assert all(r.metadata["expected"] == r.messages[-1]["content"][:len(r.metadata["expected"])].lower()
                   for r in records if r.metadata["expected"])


def test_build_recipe_converts_and_checks_options():
    recipe = build_recipe("balsa", seed=1, negative="2", yes_no="0.25", seed_format="tags", max_absent="2")
    assert (recipe.weights["negative"], recipe.yes_no, recipe.seed_format, recipe.max_absent) == (2.0, 0.25, "tags", 2)
    assert build_recipe("alarm", template_opens_think="yes", leak_filter="off").template_opens_think is True
    assert build_recipe("mallm", closed=1).closed == 1.0                    # typed values pass through
    assert set(RECIPES) == {"desta", "balsa", "balsa_ma", "alarm", "mallm", "mats"}
    assert recipe_options("mallm") == {"closed": 0.5, "swap_order": True}
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_recipe("salmonn")
    with pytest.raises(ConfigError, match="has no option.*yes_no=0.5"):
        build_recipe("balsa", negatives="1")
    with pytest.raises(ConfigError, match="must be a float"):
        build_recipe("balsa", yes_no="half")
    with pytest.raises(ConfigError, match="must be a bool"):
        build_recipe("mallm", swap_order="maybe")
    with pytest.raises(ConfigError, match="cannot be given as text"):
        build_recipe("alarm", asr="whisper")
    with pytest.raises(ConfigError, match="seed"):
        build_recipe("desta", seed="-1")
    for name, cls in RECIPES.items():                                      # (seed, **options) constructors
        assert cls(0, **recipe_options(name)).seed == 0


def test_list_options_take_a_yaml_list_or_a_file_of_lines(tmp_path):
    assert build_recipe("desta", instructions='["What sounds?", "Name it, briefly."]').instructions == (
        "What sounds?", "Name it, briefly.")
    path = tmp_path / "instructions.txt"
    path.write_text("# a comment\nWhat do you hear?\n\n  Which sound is loudest?  \n")
    assert build_recipe("desta", instructions=str(path)).instructions == ("What do you hear?", "Which sound is loudest?")
    for bad, match in (("What do you hear?", "YAML list .* or the path"), ("[]", "at least one"),
                       ("[1, 2]", "at least one non-empty string"), ("[a, b", "not a YAML list")):
        with pytest.raises(ConfigError, match=match):
            build_recipe("desta", instructions=bad)
