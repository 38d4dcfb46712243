# Vendored from https://github.com/Blinorot/ALARM at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73,
# file src/model/audio/fusion_implementations/helpers/perceiver/__init__.py.
# MIT License, Copyright (c) 2026 Petr Grinberg (full text: LICENSE in this directory).
# Edits: none (verbatim).
