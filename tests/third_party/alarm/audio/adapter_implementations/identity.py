# Vendored from https://github.com/Blinorot/ALARM at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73,
# file src/model/audio/adapter_implementations/identity.py.
# MIT License, Copyright (c) 2026 Petr Grinberg (full text: LICENSE in this directory).
# Edits (the rest is verbatim):
#   - `from src.model.<...> import` statements rewritten as relative imports (same modules)

from torch import nn

from .base import BaseAudioAdapter


class IdentityAdapter(BaseAudioAdapter):
    def __init__(
        self,
        audio_encoder_layers,
        adapter_embedding_dim,
        llm_embedding_dim,
        pre_average,
        trim_extra_padding=True,
        layer_fusion_config=None,
        use_llm_proj=True,
        **kwargs
    ):
        super().__init__(
            audio_encoder_layers=audio_encoder_layers,
            adapter_embedding_dim=adapter_embedding_dim,
            llm_embedding_dim=llm_embedding_dim,
            pre_average=pre_average,
            trim_extra_padding=trim_extra_padding,
            layer_fusion_config=layer_fusion_config,
            use_llm_proj=use_llm_proj,
        )
        if self.pre_average:
            self.adapter = Identity()
        else:
            self.adapters = nn.ModuleList()
            for _ in range(len(self.audio_encoder_layers)):
                adapter = Identity()
                self.adapters.append(adapter)


class Identity(nn.Module):
    def forward(self, x):
        return x
