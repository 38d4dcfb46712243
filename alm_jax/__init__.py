"""alm_jax: audio-language models trained the self-generated-alignment way, in JAX/Flax NNX."""
__version__ = "0.1.0"
from alm_jax.models.whisper import load_whisper_encoder  # noqa: E402,F401
from alm_jax.models.llm import load_llm  # noqa: E402,F401
