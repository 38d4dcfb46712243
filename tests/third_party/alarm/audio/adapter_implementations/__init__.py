# Vendored from https://github.com/Blinorot/ALARM at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73,
# file src/model/audio/adapter_implementations/__init__.py.
# MIT License, Copyright (c) 2026 Petr Grinberg (full text: LICENSE in this directory).
# Edits (the rest is verbatim):
#   - `from src.model.<...> import` statements rewritten as relative imports (same modules)

from .downsampler_conformer import (
    DownsamplerConformerAdapter,
)
from .identity import IdentityAdapter
from .mlp import MLPAdapter

adapter_model_dict = {
    "identity": IdentityAdapter,
    "mlp": MLPAdapter,
    "downsampler_conformer": DownsamplerConformerAdapter,
}
