"""Shared fixtures: the bundled real demo models (converted once per machine into $ALM_HOME)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_models():
    """Paths of the converted demo models (SmolLM2-135M-Instruct, Whisper tiny.en)."""
    from alm_jax.weights.demo_models import prepare_demo
    return prepare_demo()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_models.llm)
