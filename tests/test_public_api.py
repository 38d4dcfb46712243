"""The public API names other code relies on, and that importing the package stays light."""

import subprocess
import sys


def test_public_names():
    import alm_jax
    from alm_jax import load_llm, load_whisper_encoder
    from alm_jax.audio import log_mel
    assert callable(load_llm) and callable(load_whisper_encoder) and callable(log_mel)
    assert alm_jax.audio.log_mel is log_mel


def test_import_does_not_load_jax():
    code = "import sys, alm_jax, alm_jax.cli; assert 'jax' not in sys.modules, 'jax imported eagerly'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
