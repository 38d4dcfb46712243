# Vendored from https://github.com/Blinorot/ALARM at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73,
# file src/model/audio/__init__.py.
# MIT License, Copyright (c) 2026 Petr Grinberg (full text: LICENSE in this directory).
# Edits (the rest is verbatim):
#   - `from src.model.<...> import` statements rewritten as relative imports (same modules)
#   - imports of AudioEncoder and AudioFeatureExtractor dropped (they load the pretrained Whisper / W2V-BERT / MuQ / SSLAM encoders; not vendored)

from .audio_adapter import AudioAdapter
from .audio_fusion import AudioFusion
from .audio_postprocessing import AudioPostprocessing
