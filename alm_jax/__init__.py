"""alm_jax: audio-language models trained the self-generated-alignment way, in JAX/Flax NNX."""
__version__ = "0.1.0"
