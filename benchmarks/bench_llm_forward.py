"""Time a tiny-LLM forward: `load_llm` + jit (after warm-up) against `transformers` torch eager, same weights.

    .venv/bin/python benchmarks/bench_llm_forward.py [--hidden 256] [--layers 4] [--batch 8] [--seq 128]

A random Llama (GQA 8/4 heads, SwiGLU 4x, vocab 8192) is written with `save_pretrained` to a temp directory
and loaded by both. Prints one markdown table row: setting, JAX time, torch time, speed-up, max logit
difference, device, command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile

import jax
import numpy as np

from _timing import median_seconds


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    import torch
    import transformers
    from flax import nnx

    from alm_jax.weights.llm_params import load_llm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    hf = transformers.LlamaForCausalLM(config).eval()
    ids = np.random.default_rng(0).integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_llm(tmp)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ids_jax, ids_torch = jax.device_put(ids), torch.as_tensor(ids, dtype=torch.long)
    run_jax = lambda: forward(state, ids_jax).block_until_ready()  # noqa: E731

    def run_torch():
        with torch.no_grad():
            return hf(input_ids=ids_torch).logits

    diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())  # warm-up (compile) + agreement
    t_jax, t_torch = median_seconds(run_jax, args.repeats), median_seconds(run_torch, args.repeats)

    dev = jax.devices()[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_llm_forward.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    row = (f"| LLM forward, Llama h{args.hidden} x {args.layers} layers, vocab {args.vocab}, batch {args.batch} x "
           f"{args.seq} tokens, float32 | JAX jit {t_jax * 1e3:.1f} ms | torch eager {t_torch * 1e3:.1f} ms | "
           f"{t_torch / t_jax:.2f}x | max diff {diff:.1e} | {dev.platform} ({dev.device_kind}), "
           f"torch {torch.get_num_threads()} threads | `{cmd}` |")
    print(row)
    return row


if __name__ == "__main__":
    main()
