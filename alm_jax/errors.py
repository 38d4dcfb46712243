"""The package's exception types. Every error a user can cause raises one of these, with a message
that says what is wrong and what to do about it."""


class AlmError(Exception):
    """Base class of every error alm_jax raises on purpose."""


class ConfigError(AlmError, ValueError):
    """A config file, override or argument is unknown or has a bad value."""


class WeightImportError(AlmError):
    """A checkpoint directory cannot be imported: missing/unexpected/mis-shaped key, bad config."""


class AudioError(AlmError):
    """Audio cannot be decoded or is invalid (truncated, NaN/inf, zero length, absurd duration)."""


class DataError(AlmError):
    """A record, manifest or corpus is malformed, or too many bad samples were seen."""


class CheckpointError(AlmError):
    """A training checkpoint is missing, incompatible or corrupt."""
