"""Key tables of the decoder LMs (Llama, Qwen2, Qwen3): HF safetensors names -> `DecoderLM` state paths.

All three families share the Llama layout; they differ in which optional tensors exist, which the config
decides: q/k/v biases (Qwen2 always; Llama/Qwen3 with attention_bias, which also adds the o bias), MLP
biases (Llama mlp_bias), per-head q/k norms (Qwen3), and an `lm_head` only when the head is untied.
Torch Linear weights `[out, in]` are transposed to our `[in, out]` kernels.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from alm_jax.errors import WeightImportError
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.weights.hf_import import Rule, import_weights, iter_tensors, read_config, transpose

LAYER = r"model\.layers\.(\d+)\."
EMBED_KEY = "model.embed_tokens.weight"
TIED_HEAD_KEY = "lm_head.weight"


def rules_for(cfg: LLMConfig) -> list[Rule]:
    """The key table of `cfg`'s family and options."""
    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed_tokens.embedding"),
        Rule(LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", "layers.{0}.{1}.scale"),
        Rule(LAYER + r"self_attn\.(q|k|v|o)_proj\.weight", "layers.{0}.self_attn.{1}_proj.kernel", transpose),
        Rule(LAYER + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", transpose),
        Rule(r"model\.norm\.weight", "norm.scale"),
    ]
    if cfg.qkv_bias:
        rules.append(Rule(LAYER + r"self_attn\.(q|k|v)_proj\.bias", "layers.{0}.self_attn.{1}_proj.bias"))
    if cfg.o_bias:
        rules.append(Rule(LAYER + r"self_attn\.o_proj\.bias", "layers.{0}.self_attn.o_proj.bias"))
    if cfg.mlp_bias:
        rules.append(Rule(LAYER + r"mlp\.(gate|up|down)_proj\.bias", "layers.{0}.mlp.{1}_proj.bias"))
    if cfg.qk_norm:
        rules.append(Rule(LAYER + r"self_attn\.(q|k)_norm\.weight", "layers.{0}.self_attn.{1}_norm.scale"))
    if not cfg.tie_word_embeddings:
        rules.append(Rule(r"lm_head\.weight", "lm_head.kernel", transpose))
    return rules


def ignored_keys(cfg: LLMConfig) -> list[str]:
    """Known tensors that are deliberately not loaded: rotary `inv_freq` buffers (recomputed from the
    config) that old conversions saved, and a tied model's duplicated head (checked by `verify_tied_head`)."""
    keys = [LAYER + r"self_attn\.rotary_emb\.inv_freq"]
    return keys + ([r"lm_head\.weight"] if cfg.tie_word_embeddings else [])


def verify_tied_head(model_dir: str | Path) -> None:
    """Raises `WeightImportError` when a tied checkpoint stores an `lm_head.weight` that differs from the
    embedding (then the config's tie_word_embeddings is wrong). Reads just those two tensors."""
    found: dict[str, np.ndarray] = {}
    for key, load, _ in iter_tensors(model_dir):
        if key in (EMBED_KEY, TIED_HEAD_KEY):
            found[key] = load()
    if TIED_HEAD_KEY in found and EMBED_KEY in found and not np.array_equal(found[TIED_HEAD_KEY], found[EMBED_KEY]):
        raise WeightImportError(f"{model_dir}: config.json says tie_word_embeddings=true but {TIED_HEAD_KEY!r} differs "
                                f"from {EMBED_KEY!r}; set tie_word_embeddings to false to load the separate head")


def load_llm(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None, scan_layers: bool = True,
             remat: str = "none") -> DecoderLM:
    """A `DecoderLM` from a local HF directory (config.json + safetensors), parameters stored in `dtype`
    and, with `mesh`, placed with the shardings their logical axes map to. `scan_layers` / `remat`: the
    layer stack's form and per-block rematerialization (`DecoderLM`).

    Tied models: `lm_head.weight`, when the file has it, is not loaded but must equal the embedding
    (otherwise the config's tie_word_embeddings is wrong and this raises `WeightImportError`).
    """
    cfg = LLMConfig.from_hf(read_config(path))
    model = import_weights(lambda: DecoderLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                             scan_layers=scan_layers, remat=remat), path,
                           rules_for(cfg), dtype=dtype, mesh=mesh, ignore=ignored_keys(cfg),
                           family=f"llm ({cfg.model_type})")
    if cfg.tie_word_embeddings:
        verify_tied_head(path)
    return model
