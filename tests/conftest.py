"""Shared fixtures: the bundled real demo models (converted once per machine into $ALM_HOME)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test session (fresh, so nothing stale): the many training
# subprocesses (resume, kill -9, mesh shapes, launch) compile the same tiny steps again and again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="alm-jax-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def demo_models():
    """Paths of the converted demo models (SmolLM2-135M-Instruct, Whisper tiny.en)."""
    from alm_jax.weights.demo_models import prepare_demo
    return prepare_demo()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_models.llm)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on 2 shared cores torch's spin-waiting pool makes the reference
    models several times slower (generation measured 92 s vs 7 s)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_models):
    """A tiny training setup on disk (tests/tiny_setup.py): tiny Llama + Whisper dirs, a corpus, paths.json."""
    import json

    from tiny_setup import write_tiny_setup
    root = tmp_path_factory.mktemp("tiny")
    paths = write_tiny_setup(root, demo_models.llm)
    (root / "paths.json").write_text(json.dumps(paths))
    return root


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory, demo_tokenizer):
    """A 2-layer random Llama over the SmolLM2 vocabulary, saved with the SmolLM2 tokenizer."""
    from hf_tiny_llm import save, tiny_hf_llm
    path = tmp_path_factory.mktemp("tiny-smollm2")
    save(tiny_hf_llm("llama", vocab_size=len(demo_tokenizer), max_position_embeddings=1024, tied=True), path)
    demo_tokenizer.save_pretrained(path)
    return path
