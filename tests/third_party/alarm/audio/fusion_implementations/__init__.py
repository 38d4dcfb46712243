# Vendored from https://github.com/Blinorot/ALARM at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73,
# file src/model/audio/fusion_implementations/__init__.py.
# MIT License, Copyright (c) 2026 Petr Grinberg (full text: LICENSE in this directory).
# Edits (the rest is verbatim):
#   - `from src.model.<...> import` statements rewritten as relative imports (same modules)

from .crossattention import CrossAttentionFusion
from .perceiver import (
    MultiPerceiverFusion,
    PerceiverFusion,
)

fusion_model_dict = {
    "crossattention": CrossAttentionFusion,
    "perceiver": PerceiverFusion,
    "multiperceiver": MultiPerceiverFusion,
}
