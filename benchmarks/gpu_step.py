"""Trainable-aware MFU of the training step of a DeSTA2.5-shaped audio-language model on one accelerator.

    python benchmarks/gpu_step.py                     # the full shape: needs a GPU/TPU with ~45 GB
    python benchmarks/gpu_step.py --tiny              # everything shrunk: proves the script on CPU (< 1 min)
    python benchmarks/gpu_step.py --batch 8 --text 300 --steps 10
    python benchmarks/gpu_step.py --sampler           # the sampler's tokens/s on the Llama-3.1-8B shape
                                                      # (batch 16 x 192-token prompts, 64 new tokens, greedy)

Model (random weights, no checkpoint; frozen parts stored in bf16, the trainable connector in float32,
compute in bf16): Whisper-large-v3-shaped encoder (32 blocks, d=1280, 20 heads, ffn 5120, 128 mel bins,
30 s input -> 1500 positions), taps after blocks 8/16/24/32; DeSTA Q-Former (6 BERT layers with cross-
attention, hidden 1280, 20 heads, ffn 3072, 64 queries per tap, softmax over the 4 taps, LN + Linear to
4096); Llama-3.1-8B-shaped frozen LLM (32 layers, d=4096, 32 heads / 8 KV heads, ffn 14336, vocab
128256). Batch: `--batch` samples of `--text` text tokens plus the 64 audio tokens, and one 30 s
waveform each (log-mel runs inside the step).

The step is the trainer's (`build_train_step` + `step.alm_loss`): gradients for the connector only,
AdamW, clipping, the non-finite guard. FLOPs per step come from `flops.step_flops` (encoder forward
1x, connector 3x, frozen LLM 2x; see `alm_jax/training/flops.py`); MFU = FLOPs / step time / peak
(dense bf16 peak of the device, `flops.peak_flops_per_device`; none for CPUs).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

SR = 16000

FULL = dict(
    whisper=dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                 encoder_ffn_dim=5120, max_source_positions=1500),
    taps=(7, 15, 23, 31),
    connector=dict(kind="desta", num_queries=64, num_layers=6, num_heads=20, hidden=1280, intermediate=3072),
    llm=dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
             num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
             rope_original_max_positions=8192, max_position_embeddings=131072),
    batch=8, text=300, audio_seconds=30.0,
)
TINY = dict(
    whisper=dict(num_mel_bins=128, d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=128,
                 max_source_positions=1500),
    taps=(0, 1, 2, 3),
    connector=dict(kind="desta", num_queries=8, num_layers=1, num_heads=4, hidden=64, intermediate=128),
    llm=dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096),
    batch=2, text=32, audio_seconds=30.0,
)


def build_model(shape: dict, dtype, abstract: bool = False):
    """The ALM with random weights, created inside one jit (no host copy of the frozen weights);
    `abstract`: shapes only (`nnx.eval_shape`), nothing allocated."""
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.config import ConnectorConfig, EncoderConfig
    from alm_jax.models.alm import AudioLanguageModel
    from alm_jax.models.llm import DecoderLM, LLMConfig
    from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig

    wcfg, lcfg = WhisperEncoderConfig(**shape["whisper"]), LLMConfig(**shape["llm"])
    enc_cfg = EncoderConfig(path="random", taps=shape["taps"], tap_indexing="blocks", pad_to_seconds=shape["audio_seconds"])
    conn = ConnectorConfig(**shape["connector"])

    def create():
        rngs = nnx.Rngs(0)
        encoder = WhisperEncoder(wcfg, dtype=dtype, param_dtype=dtype, rngs=rngs)
        llm = DecoderLM(lcfg, dtype=dtype, param_dtype=dtype, rngs=rngs)
        return AudioLanguageModel([encoder], llm, conn, [enc_cfg], dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    return nnx.eval_shape(create) if abstract else nnx.jit(create)()


def make_batch(batch: int, text: int, queries: int, vocab: int, seconds: float, seed: int = 0) -> dict:
    """`text` tokens + `queries` audio slots per row (sequence text + queries), the loss on the text after the
    audio, and one `seconds` waveform per row."""
    rng = np.random.default_rng(seed)
    seq = text + queries
    ids = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    clip = -np.ones((batch, seq), np.int32)
    pos = -np.ones((batch, seq), np.int32)
    start = min(16, text)
    clip[:, start:start + queries], pos[:, start:start + queries] = 0, np.arange(queries)
    mask = np.zeros((batch, seq), np.float32)
    mask[:, start + queries:] = 1.0
    n = int(seconds * SR)
    audio = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
            "attention_mask": np.ones((batch, seq), np.int32), "audio_clip": clip, "audio_pos": pos, "audio": audio,
            "audio_samples": np.full((batch,), n, np.int32)}


def sampler_tokens_per_s(shape: dict, dtype, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    """Greedy `generation.sampler.generate` on a random-weight LLM of `shape["llm"]` (created on the device):
    `batch` prompts of `prompt` random tokens, exactly `new_tokens` new tokens each (no EOS). Median of
    `repeats` timed calls after one compiling call."""
    import jax
    from flax import nnx

    from alm_jax.generation import sampler
    from alm_jax.models.llm import DecoderLM, LLMConfig

    lcfg = LLMConfig(**shape["llm"])
    model = nnx.jit(lambda: DecoderLM(lcfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))()
    ids = np.random.default_rng(0).integers(0, lcfg.vocab_size, size=(batch, prompt)).astype(np.int32)
    cfg = sampler.SamplingConfig(max_new_tokens=new_tokens)

    def run():
        tokens, _ = sampler.generate(model, ids, None, cfg)
        return jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    wall = float(np.median(times))
    return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "seconds": wall,
            "tokens_per_s": batch * new_tokens / wall, "compile_and_first_call_s": compile_s}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="shrink everything (runs on CPU in well under a minute)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 8; tiny: 2)")
    ap.add_argument("--text", type=int, default=None, help="text tokens per sample (default 300; tiny: 32)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--count-only", action="store_true",
                    help="only count the FLOPs per step (abstract model: no device memory) and the step time "
                         "each MFU level would need on an H100 SXM")
    ap.add_argument("--sampler", action="store_true",
                    help="time the sampler instead: greedy decoding on the LLM shape (random weights)")
    ap.add_argument("--prompt", type=int, default=192, help="--sampler: prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64, help="--sampler: new tokens per row")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from alm_jax.config import OptimConfig
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.flops import one_sample, peak_flops_per_device, step_flops
    from alm_jax.training.step import TrainState, alm_loss, build_train_step, make_optimizer, make_schedule

    shape = dict(TINY if args.tiny else FULL)
    dev = jax.devices()[0]
    if args.sampler:
        r = sampler_tokens_per_s(shape, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                                 args.batch or 16, args.prompt, args.new_tokens, max(args.steps // 3, 1))
        print(f"device: {dev.platform} ({dev.device_kind})  |  sampler, {'tiny' if args.tiny else 'Llama-3.1-8B'} "
              f"shape, {args.dtype}: batch {r['batch']} x {r['prompt']}-token prompts, {r['new_tokens']} new tokens: "
              f"{r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.2f} s per call; compile + first call "
              f"{r['compile_and_first_call_s']:.1f} s)")
        return r
    batch_size, text = args.batch or shape["batch"], args.text or shape["text"]
    t0 = time.perf_counter()
    model = build_model(shape, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, abstract=args.count_only)
    batch = make_batch(batch_size, text, shape["connector"]["num_queries"], shape["llm"]["vocab_size"],
                       shape["audio_seconds"])
    flops = step_flops(model, one_sample(batch), batch_size)
    build_s = time.perf_counter() - t0
    if args.count_only:
        h100 = peak_flops_per_device("NVIDIA H100 80GB HBM3")
        parts = {k: flops[k] * m_ / 1e12 for k, m_ in (("encoder", 1), ("connector", 3), ("llm", 2), ("lora", 3))}
        print(f"{'tiny' if args.tiny else 'DeSTA2.5 / Llama-3.1-8B'}: batch {batch_size} x "
              f"{text + shape['connector']['num_queries']} tokens + {shape['audio_seconds']:.0f} s audio: "
              f"{flops['train'] / 1e12:.2f} TFLOP per step (" + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v)
              + "); on an H100 SXM (989 TFLOP/s dense bf16) " + ", ".join(
                  f"{u:.0%} MFU = {flops['train'] / (u * h100) * 1e3:.0f} ms/step" for u in (0.3, 0.5)))
        return {"train_tflops_per_step": flops["train"] / 1e12, **{f"{k}_tflops": v for k, v in parts.items()}}

    ocfg = OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000)
    graphdef, trainable, frozen = split_trainable(model)       # one device: no mesh, default placement
    del model
    tx = make_optimizer(ocfg)
    state = TrainState(trainable, jax.jit(tx.init)(trainable))
    data = jax.device_put(batch)
    step_fn = build_train_step(graphdef, tx, alm_loss, schedule=make_schedule(ocfg))

    t0 = time.perf_counter()
    for i in range(2):                                                  # compile + warm-up
        state, m = step_fn(state, frozen, data, i)
        m["loss"].block_until_ready()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = step_fn(state, frozen, data, 2 + i)
    m["loss"].block_until_ready()
    step_s = (time.perf_counter() - t0) / args.steps

    peak = peak_flops_per_device(dev.device_kind)
    mfu = flops["train"] / step_s / peak if peak else None
    seq = text + shape["connector"]["num_queries"]
    cmd = " ".join(shlex.quote(a) for a in ["python", "benchmarks/gpu_step.py", *(sys.argv[1:] if argv is None else argv)])
    share = {k: flops[k] * m_ / flops["train"] for k, m_ in (("encoder", 1), ("connector", 3), ("llm", 2), ("lora", 3))}
    result = {"device": f"{dev.platform} ({dev.device_kind})", "shape": "tiny" if args.tiny else "DeSTA2.5 / Llama-3.1-8B",
              "batch": batch_size, "seq": seq, "dtype": args.dtype, "step_s": step_s,
              "tokens_per_s": batch_size * seq / step_s, "samples_per_s": batch_size / step_s,
              "train_tflops_per_step": flops["train"] / 1e12, "achieved_tflops_per_s": flops["train"] / step_s / 1e12,
              "peak_tflops_per_s": peak / 1e12 if peak else None, "mfu": mfu,
              "loss": float(m["loss"]), "skipped": int(m["skipped"]), "build_s": build_s, "compile_and_warmup_s": warm_s}
    print(f"device: {result['device']}  |  model: {result['shape']}, {args.dtype}  |  batch {batch_size} x {seq} tokens "
          f"({text} text + {shape['connector']['num_queries']} audio) + {shape['audio_seconds']:.0f} s audio each")
    print(f"FLOPs/step (trainable-aware): {flops['train'] / 1e12:.2f} TFLOP = "
          + ", ".join(f"{k} {v:.0%}" for k, v in share.items() if v))
    print(f"step time {step_s * 1e3:.1f} ms (mean of {args.steps} after warm-up)  |  {result['tokens_per_s']:.0f} tokens/s  |  "
          f"{result['achieved_tflops_per_s']:.2f} TFLOP/s  |  MFU "
          + (f"{mfu:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16" if mfu is not None else "n/a (no peak for this device)"))
    print(f"loss {result['loss']:.4f} (skipped {result['skipped']}); build {build_s:.1f} s, compile + 2 warm-up steps "
          f"{warm_s:.1f} s; command: `{cmd}`")
    return result


if __name__ == "__main__":
    main()
