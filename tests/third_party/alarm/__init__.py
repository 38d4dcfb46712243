"""ALARM's own audio-path modules (https://github.com/Blinorot/ALARM, MIT License, Copyright (c) 2026 Petr
Grinberg; LICENSE here is ALARM's LICENSE_CODE, verbatim), vendored for `tests/test_alarm_public_parity.py`:
the adapters, the fusions and the wrapper's `get_audio_embeddings` / `prepare_multimodal_inputs`. The layout
mirrors ALARM's `src/model/`; each file names its source path, the commit and its edits (imports only) in its
header. Only `audio/fusion_implementations/helpers/perceiver/_einops.py` is not ALARM's.
"""
