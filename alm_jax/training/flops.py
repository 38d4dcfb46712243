"""Trainable-aware FLOP accounting and MFU.

Conventions (all counts are exact Python ints for one sample):

* A matmul of an `[m, k]` activation with a `[k, n]` weight costs `2*m*k*n` FLOPs (multiply + add).
  Only matmuls and attention score/value products are counted; embedding lookups, norms, softmax,
  activations and the optimizer are ignored (they are a few % for transformers).
* Transformer forward, one sequence of `S` tokens with `L` layers:

      matmul    = 2 * S * (L * (d*hd*(2*H + 2*KV) + m*d*d_ff) + d*vocab)   m = 3 gated MLP, 2 plain
      attention = 2 * 2 * L * S^2 * H*hd          (QK^T and AV), halved when causal

  i.e. per token "2 x matmul params + 4 * L * S * d_attn". Causal attention is counted at half, the
  MaxText convention since its PR #1988 (older MaxText tables count it in full: not comparable).
  `vocab=0` leaves the output projection out (encoders, or losses that skip the LM head).
* Whisper-shaped encoder: conv stem (conv1 `n_mels->d`, kernel 3, at `2*frames` mel frames; conv2
  `d->d`, kernel 3, stride 2, at `frames` outputs) + non-causal blocks with a plain GELU MLP at `frames`
  positions (1500 for 30 s). Pass only the layers that are actually run (up to the deepest tap).
* Training multipliers on forward FLOPs (backward of a matmul = one activation-gradient matmul + one
  weight-gradient matmul, each as costly as the forward):

      frozen encoder behind stop_gradient        1x  forward only
      trainable connector / adapters / LoRA      3x  forward + activation grads + weight grads
      frozen LLM blocks that gradients traverse  2x  forward + activation grads, no weight grads
      fully trained LLM                          3x  (the usual 6N per token)

  With LoRA, count the frozen base LLM at 2x and add the LoRA matmuls (`lora_forward_flops`) at 3x.
  Recomputation from rematerialization is NOT counted: this is model FLOPs (MFU), not hardware FLOPs.
* MFU = model FLOPs per step / step time / (devices * peak FLOP/s per device). Peak figures are dense
  bf16 (no 2:4 sparsity). There is no meaningful peak for CPUs: MFU is not reported there (None).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Sequence

# Dense bf16 peak FLOP/s per device (chip). None: not reported.
PEAK_BF16_FLOPS: dict[str, float | None] = {
    "h100": 989e12,       # H100 SXM; 1,979 is with sparsity
    "h100_pcie": 756e12,  # H100 PCIe (1,513 with sparsity)
    "h200": 989e12,
    "a100": 312e12,
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "cpu": None,
}

TRAIN_MULTIPLIER = {"forward_only": 1, "frozen": 2, "trained": 3}


def _attention_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    return d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)   # q, o: H heads; k, v: KV heads


def dense_forward_flops(tokens: int, matmul_params: int) -> int:
    """Forward FLOPs of `tokens` rows through matmuls holding `matmul_params` weights: 2*tokens*params."""
    return 2 * tokens * matmul_params


def transformer_forward_flops(num_layers: int, d_model: int, d_ff: int, n_heads: int, n_kv_heads: int,
                              head_dim: int, seq_len: int, vocab: int, gated_mlp: bool = True,
                              causal: bool = True) -> int:
    """Forward FLOPs of one `seq_len`-token sequence through a decoder (or encoder) stack (see module doc)."""
    per_layer = _attention_params(d_model, n_heads, n_kv_heads, head_dim) + (3 if gated_mlp else 2) * d_model * d_ff
    matmul = dense_forward_flops(seq_len, num_layers * per_layer + d_model * vocab)
    attention = 2 * 2 * num_layers * seq_len * seq_len * n_heads * head_dim
    return matmul + (attention // 2 if causal else attention)


def encoder_forward_flops(num_layers: int, d_model: int, d_ff: int, n_heads: int, n_mels: int = 80,
                          frames: int = 1500, conv_kernel: int = 3) -> int:
    """Forward FLOPs of a Whisper-shaped audio encoder on one clip: conv stem + `num_layers` blocks at
    `frames` positions (after the stride-2 conv; 1500 for a 30 s pad)."""
    conv1 = 2 * (2 * frames) * conv_kernel * n_mels * d_model
    conv2 = 2 * frames * conv_kernel * d_model * d_model
    blocks = transformer_forward_flops(num_layers, d_model, d_ff, n_heads, n_heads, d_model // n_heads,
                                       frames, vocab=0, gated_mlp=False, causal=False)
    return conv1 + conv2 + blocks


def lora_forward_flops(tokens: int, shapes: Iterable[tuple[int, int]], rank: int) -> int:
    """Forward FLOPs of LoRA adapters (`x @ A @ B`, A `[in, r]`, B `[r, out]`) on every adapted
    `(in, out)` weight in `shapes` (list one entry per layer and target), for `tokens` rows."""
    return sum(dense_forward_flops(tokens, rank * (i + o)) for i, o in shapes)


def alm_train_flops(encoder_fwd: int, connector_fwd: int, llm_fwd: int, *, lora_fwd: int = 0,
                    llm: Literal["frozen", "trained", "forward_only"] = "frozen",
                    encoder: Literal["forward_only", "frozen", "trained"] = "forward_only") -> int:
    """Training FLOPs of one sample of an audio-language model.

    encoder_fwd: forward FLOPs of all audio encoders (stop_gradient: `forward_only`, 1x).
    connector_fwd: forward FLOPs of the trainable connector (3x).
    llm_fwd: forward FLOPs of the LLM's base weights on the sample's full sequence; `frozen` (2x) when
    gradients flow through it to the connector (the usual case), `trained` (3x) when its weights train,
    `forward_only` (1x) when nothing before or inside it is trained.
    lora_fwd: forward FLOPs of LoRA adapters inside the LLM (3x)."""
    for name, mode in (("llm", llm), ("encoder", encoder)):
        if mode not in TRAIN_MULTIPLIER:
            raise ValueError(f"{name}={mode!r}: choose one of {sorted(TRAIN_MULTIPLIER)}")
    return (TRAIN_MULTIPLIER[encoder] * encoder_fwd + 3 * connector_fwd
            + TRAIN_MULTIPLIER[llm] * llm_fwd + 3 * lora_fwd)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s for a `jax.Device.device_kind` string (default: this process's first
    device); None on CPU or for a device not in `PEAK_BF16_FLOPS`."""
    if device_kind is None:
        import jax
        device_kind = jax.devices()[0].device_kind
    k = device_kind.lower()
    if "tpu" in k:
        if "v6" in k:
            return PEAK_BF16_FLOPS["v6e"]
        if "v5 lite" in k or "v5e" in k or "v5litepod" in k:
            return PEAK_BF16_FLOPS["v5e"]
        if "v5" in k:
            return PEAK_BF16_FLOPS["v5p"]
        if "v4" in k:
            return PEAK_BF16_FLOPS["v4"]
        return None
    if "h100" in k:
        return PEAK_BF16_FLOPS["h100_pcie" if "pcie" in k else "h100"]
    if "h200" in k:
        return PEAK_BF16_FLOPS["h200"]
    if "a100" in k:
        return PEAK_BF16_FLOPS["a100"]
    return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: flops_per_step / step_time / (num_devices * peak); None when
    the peak is unknown (CPU) or the step time is not positive."""
    if peak_flops_per_device is None or step_time_s <= 0 or num_devices <= 0:
        return None
    return flops_per_step / step_time_s / (num_devices * peak_flops_per_device)


def llm_layer_shapes(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                     targets: Sequence[str] = ("q_proj", "v_proj")) -> list[tuple[int, int]]:
    """`(in, out)` of one LLM layer's projections named in `targets` (for `lora_forward_flops`)."""
    table = {"q_proj": (d_model, n_heads * head_dim), "k_proj": (d_model, n_kv_heads * head_dim),
             "v_proj": (d_model, n_kv_heads * head_dim), "o_proj": (n_heads * head_dim, d_model)}
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {sorted(table)}")
    return [table[t] for t in targets]


# ------------------------------------------------------------------------------------------- traced programs
# A connector of any kind is counted from its traced program: the matmuls of the whole forward minus those
# of the encoders, the log-mel filterbank and the LLM traced alone on the same shapes.

def matmul_flops(jaxpr) -> int:
    """FLOPs of every `dot_general` (2 * output size * contracted size) and convolution in a (closed)
    jaxpr, nested calls included (a scan's body counts `length` times)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            per_out = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])   # in channels (per group) x kernel
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in _sub_jaxprs(eqn.params):
            total += times * matmul_flops(sub)
    return total


def _sub_jaxprs(params):
    """The (closed) jaxprs among an equation's parameters (pjit, scan, cond branches, custom_vjp, remat)."""
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                yield v


def _abstract(tree):
    import jax
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _encoder_layers_run(model, i: int) -> int:
    """Blocks of encoder i that the model runs: up to the deepest state entry its connector reads (XLA
    drops the rest). Entry t is block t's output ("blocks") or hidden state t (0 = embeddings, "hf")."""
    blocks = model.encoder_cfgs[i].tap_indexing == "blocks"
    return max(t + 1 if blocks else t for t in model.connector.encoder_taps[i])


def step_flops(model, sample: dict[str, Any], batch_size: int) -> dict[str, int]:
    """Trainable-aware model FLOPs of one training step of `batch_size` samples shaped like `sample` (one
    sample's batch: arrays or `jax.ShapeDtypeStruct`s, leading axis 1 for text keys and C clips for audio
    keys). Returns the forward FLOPs of the whole batch by part, `{'encoder', 'connector', 'llm', 'lora'}`,
    and `'train'`, the step total with the multipliers of `flops.alm_train_flops` (see the module doc).

    Encoder and LLM are counted from their configs (`training/flops.py`); an encoder family without a
    formula (W2V-BERT) is counted from its traced program. The connector (any kind) is
    what remains of the matmul FLOPs of the traced forward after the encoders, the log-mel filterbank
    and the LLM (all traced alone, on the same shapes) are taken out."""
    import jax
    from flax import nnx

    from alm_jax.audio.features import log_mel
    from alm_jax.models.lora import lora_per_layer

    graphdef, state = nnx.split(model)
    params = _abstract(state)
    sample = _abstract(dict(sample))
    text_len = sample["input_ids"].shape[1]
    trace = lambda f, *args: matmul_flops(jax.make_jaxpr(f)(params, *args))   # noqa: E731
    used = range(len(model.connector.encoder_taps))
    if not {"audio", "audio_features"} & sample.keys():   # text-only batches (MATS captions) run no audio encoder
        used = range(0)

    encoder = taken = 0
    for i in used:
        c, ecfg = model.encoders[i].config, model.encoder_cfgs[i]
        if not hasattr(c, "num_mel_bins"):   # no analytic formula (e.g. W2V-BERT): its traced program, features
            def states(st, a, n, i=i):        # included, every layer (an upper bound when the taps stop earlier)
                return nnx.merge(graphdef, st).encoder_states(i, a, None, n)
            own = trace(states, sample["audio"], sample["audio_samples"])
            taken, encoder = taken + own, encoder + own
            continue
        if "audio_features" in sample:
            feats = sample["audio_features"]
        else:
            def mel(st, a, c=c, e=ecfg):
                return log_mel(a, n_mels=c.num_mel_bins, pad_to_seconds=e.pad_to_seconds)
            feats = jax.eval_shape(mel, params, sample["audio"])
            taken += trace(mel, sample["audio"])
        feats = jax.ShapeDtypeStruct(feats.shape, model.encoders[i].dtype)
        keep = model.tapped_blocks(i)   # the blocks the model runs (scanned or not), as in its forward
        taken += trace(lambda st, x, i=i, keep=keep: nnx.merge(graphdef, st).encoders[i](x, keep=keep), feats)
        frames = -(-feats.shape[2] // 2)
        encoder += encoder_forward_flops(_encoder_layers_run(model, i), c.d_model, c.encoder_ffn_dim,
                                           c.encoder_attention_heads, c.num_mel_bins, frames)
    if "caption_ids" in sample:   # MATS text-only: CLAP's frozen text tower (forward only), from its traced program
        own = trace(lambda st, i, m: nnx.merge(graphdef, st).encoders[0].text_embeds(i, m), sample["caption_ids"],
                    sample["caption_mask"])
        taken, encoder = taken + own, encoder + own
    lc = model.llm.cfg
    embeds = jax.ShapeDtypeStruct((1, text_len, lc.hidden_size), model.dtype)
    mask = sample.get("attention_mask")
    taken += trace(lambda st, e, m: nnx.merge(graphdef, st).llm(inputs_embeds=e, attention_mask=m), embeds, mask)
    connector = trace(lambda st, b: nnx.merge(graphdef, st)(b), sample) - taken
    llm = transformer_forward_flops(lc.num_layers, lc.hidden_size, lc.intermediate_size, lc.num_heads,
                                      lc.num_kv_heads, lc.head_dim, text_len, lc.vocab_size)
    lora = sum(lora_forward_flops(text_len, [(one.wrapper.base.in_features, one.wrapper.base.out_features)],
                                  one.wrapper.rank) for one in lora_per_layer(model.llm))   # stacked: per layer
    out = {"encoder": batch_size * encoder, "connector": batch_size * connector, "llm": batch_size * llm,
           "lora": batch_size * lora}
    out["train"] = alm_train_flops(out["encoder"], out["connector"], out["llm"], lora_fwd=out["lora"])
    return out


def one_sample(batch: dict[str, Any]) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s of one sample of a pipeline batch (numpy arrays; every leading axis divided by
    the batch size)."""
    import jax
    b = batch["input_ids"].shape[0]
    return {k: jax.ShapeDtypeStruct((v.shape[0] // b, *v.shape[1:]), v.dtype) for k, v in batch.items()}
