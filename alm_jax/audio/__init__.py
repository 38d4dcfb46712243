"""Audio: features (Whisper log-mel in JAX)."""

from alm_jax.audio.features import log_mel

__all__ = ["log_mel"]
