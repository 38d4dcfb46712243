"""The forgetting suite (alm_jax/evaluation/forgetting.py): the ALM without audio (connector unused, LoRA off or
at its zero init) equals the freshly loaded backbone exactly; a changed adapter is detected; the checks."""

import json

import jax
import numpy as np
import pytest

from tiny_setup import tiny_config


@pytest.fixture(scope="module")
def paths(tiny):
    return json.loads((tiny / "paths.json").read_text())


def _suite(cfg, **kw):
    from alm_jax.config import SuiteConfig
    from alm_jax.evaluation import EVALUATORS
    return EVALUATORS["forgetting"].build(cfg, SuiteConfig(name="forgetting", batch_size=6, max_new_tokens=8, **kw))


def test_alm_without_audio_equals_the_backbone(paths, tmp_path):
    from alm_jax.models.lora import lora_layers
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(paths, tmp_path, "model.lora.rank=2")
    model = build_alm(cfg.model, seed=cfg.seed)
    suite = _suite(cfg)
    m = suite.run(model)   # LoRA at init: B = 0, the adapters add exactly nothing
    assert m["eval/forgetting/exact_match"] == 100.0 and m["eval/forgetting/kl"] == 0.0
    assert m["eval/forgetting/if_delta"] == 0.0
    assert m["eval/forgetting/if_rate_alm"] == m["eval/forgetting/if_rate_backbone"]
    items = suite.details["items"]
    assert len(items) == 17 and all(i["same"] and i["alm"] == i["backbone"] for i in items)
    # a trained (non-zero) adapter changes the text model: the suite must see it
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model.llm):
        layer.lora_b[...] = jax.numpy.asarray(rng.normal(0, 0.5, layer.lora_b.shape), np.float32)
    changed = suite.run(model)
    assert changed["eval/forgetting/kl"] > 1e-4
    assert changed["eval/forgetting/exact_match"] < 100.0


def test_alm_without_lora_equals_the_backbone_and_kl_off(paths, tmp_path):
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(paths, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "One word please.", "check": {"words": 1}}\n')
    suite = _suite(cfg, data=str(prompts), kl=False)
    m = suite.run(build_alm(cfg.model, seed=cfg.seed))
    assert m == {"eval/forgetting/exact_match": 100.0, "eval/forgetting/if_rate_alm": m["eval/forgetting/if_rate_backbone"],
                 "eval/forgetting/if_rate_backbone": m["eval/forgetting/if_rate_backbone"], "eval/forgetting/if_delta": 0.0}
    assert suite.backbone is None   # freed once its answers were cached


def test_checks():
    from alm_jax.evaluation.forgetting import language_of, passes
    assert passes("Sand and sun.", {"max_words": 15}) and not passes("one two three", {"max_words": 2})
    assert passes("Warm", {"words": 1}) and not passes("It is warm", {"words": 1})
    assert passes("- apple\n- pear\n* plum", {"bullets": 3}) and not passes("- apple\n- pear", {"bullets": 3})
    assert passes('```json\n{"city": "Paris", "country": "France"}\n```', {"json_keys": ["city", "country"]})
    assert not passes('{"city": "Paris"}', {"json_keys": ["city", "country"]})
    assert passes("[1, 2, 3]", {"json": True}) and not passes("one, two, three", {"json": True})
    assert language_of("Le ciel est bleu et la mer est calme.") == "fr"
    assert language_of("Mi estación favorita es el verano porque hace calor.") == "es"
    assert language_of("The sky is blue.") == "en" and language_of("Blau") is None
    assert passes("HELLO", {"uppercase": True, "words": 1}) and not passes("Hello", {"uppercase": True})


def test_prompt_file_errors(tmp_path):
    from alm_jax.errors import DataError
    from alm_jax.evaluation.forgetting import load_prompts
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "check": {"wordz": 3}}\n')
    with pytest.raises(DataError, match="p.jsonl:1: `check` must be"):
        load_prompts(tmp_path / "p.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
