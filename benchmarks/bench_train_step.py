"""Train-step time of a small DeSTA-connector ALM: our jitted trainer step (JAX) against the same model
in PyTorch eager, built from `transformers` modules, with the same weights and the same batch.

    .venv/bin/python benchmarks/bench_train_step.py [--batch 2] [--text 128] [--llm-layers 30] [--torch-threads default,1]

Model (all float32): Whisper tiny.en-shaped encoder (d=384, 4 blocks, 6 heads, ffn 1536, 80 mel, 30 s input
-> 1500 positions; frozen), taps = HF hidden_states 2 and 4; DeSTA Q-Former (2 BERT layers with
cross-attention, hidden 384, 6 heads, ffn 1536, 64 queries per tap, softmax over taps, LN + Linear;
trainable); SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9/3 heads, ffn 1536, vocab 49152, tied;
frozen). One step = log-mel of the raw waveforms + encoder (no gradient) + connector + splice into the text
embeddings + LLM + token-mean cross-entropy + backward to the connector + global-norm clip + AdamW.

JAX: `build_train_step` with `step.alm_loss` (the trainer's step, donation on). PyTorch: `WhisperEncoder`
(output_hidden_states) under no_grad, `alm_jax.testing.torch_desta.DestaConnector` (a `BertEncoder` Q-Former,
eager attention, as DeSTA), `LlamaForCausalLM` with `inputs_embeds`, frozen parts `requires_grad_(False)`,
`torch.optim.AdamW` on the connector. The first step's losses are compared (same weights) to show the two
compute the same thing.
Prints a markdown table: one JAX row, one torch row per thread setting, the ratios and the command.

`--compare-scan`: no torch; the same JAX step twice in one run, layer stacks (LLM, Whisper encoder, Q-Former)
scanned and unrolled (`model.scan_layers`, with `--remat`), same weights and batch: per mode the compile
time (trace + lower, then XLA compile), the steady-state step time (median of `--repeats`) and the load
average when measured, then |loss diff| and |grad-norm diff| of the first step.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time

import numpy as np

from _timing import median_seconds

SR = 16000
N_FFT, HOP = 400, 160



def make_batch(batch: int, text: int, queries: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with `queries` audio slots at positions 4.. of each row, a 30 s clip per row, and the
    loss on the last quarter of the text."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, text + 1)).astype(np.int32)
    clip = -np.ones((batch, text), np.int32)
    pos = -np.ones((batch, text), np.int32)
    clip[:, 4:4 + queries], pos[:, 4:4 + queries] = 0, np.arange(queries)
    mask = np.zeros((batch, text), np.float32)
    mask[:, -text // 4:] = 1.0
    t = np.arange(30 * SR) / SR
    audio = np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * b) * t) + 0.05 * rng.standard_normal(t.size)
                      for b in range(batch)]).astype(np.float32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
            "attention_mask": np.ones((batch, text), np.int32), "audio_clip": clip, "audio_pos": pos, "audio": audio,
            "audio_samples": np.full((batch,), 30 * SR, np.int32)}


# ------------------------------------------------------------------------------------------- torch side


def build_torch(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

    from alm_jax.testing.torch_desta import DestaConnector

    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(
        d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
        max_source_positions=1500, decoder_layers=1, decoder_attention_heads=6, decoder_ffn_dim=256,
        vocab_size=128, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, attn_implementation="sdpa")).eval()
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.llm_layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
        rms_norm_eps=1e-5, attn_implementation="sdpa")).eval()

    connector = DestaConnector(n_taps=2, n_queries=args.queries, hidden=384, heads=6, intermediate=1536, layers=2,
                               llm_dim=576)        # DeSTA2.5 QformerConnector; zero layer weights
    whisper.requires_grad_(False)
    llm.requires_grad_(False)
    return whisper, connector, llm


def torch_log_mel(audio, filters):
    """Whisper log-mel in torch (the transformers extractor's torch path): [B, S] -> [B, 80, S // 160]."""
    import torch
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = filters @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log + 4.0) / 4.0


def torch_step_fn(whisper, connector, llm, batch):
    import torch

    from alm_jax.audio.features import mel_filterbank
    filters = torch.from_numpy(mel_filterbank(80, SR).T.astype(np.float32))
    opt = torch.optim.AdamW(connector.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    ids, targets = t["input_ids"].long(), t["targets"].long()
    rows = torch.arange(ids.shape[0])[:, None]
    queries = int((t["audio_clip"][0] >= 0).sum())
    slot = torch.where(t["audio_clip"] >= 0, (rows + t["audio_clip"].long()) * queries + t["audio_pos"].long(), -1)
    embed = llm.get_input_embeddings()

    def step():
        with torch.no_grad():                                               # frozen encoder: forward only
            feats = torch_log_mel(t["audio"], filters)
            hidden = whisper.encoder(feats, output_hidden_states=True).hidden_states
        tokens = connector([hidden[2], hidden[4]])                          # [B, queries, 576]
        flat = tokens.reshape(-1, tokens.shape[-1])
        text = embed(ids)
        embeds = torch.where((slot >= 0)[..., None], flat[slot.clamp(min=0)], text)
        logits = llm(inputs_embeds=embeds, attention_mask=t["attention_mask"]).logits.float()
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]
        loss = (nll * t["loss_mask"]).sum() / t["loss_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(connector.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


# ------------------------------------------------------------------------------------------- JAX side


def build_jax(whisper, connector, llm, args, tmp, *, scan_layers: bool = True, remat: str = "none"):
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.config import ConnectorConfig, EncoderConfig
    from alm_jax.models.alm import AudioLanguageModel
    from alm_jax.models.connectors import load_bert_qformer_weights
    from alm_jax.weights.llm_params import load_llm
    from alm_jax.weights.whisper_params import load_whisper_encoder

    whisper.save_pretrained(f"{tmp}/whisper")
    llm.save_pretrained(f"{tmp}/llm")
    enc_cfg = EncoderConfig(path=f"{tmp}/whisper", taps=(2, 4), tap_indexing="hf", pad_to_seconds=30.0)
    conn_cfg = ConnectorConfig(kind="desta", num_queries=args.queries, num_layers=2, num_heads=6, hidden=384,
                               intermediate=1536)
    stack_kw = dict(scan_layers=scan_layers, remat=remat)
    model = AudioLanguageModel([load_whisper_encoder(f"{tmp}/whisper", scan_layers=scan_layers)],
                               load_llm(f"{tmp}/llm", **stack_kw), conn_cfg, [enc_cfg], dtype=jnp.float32,
                               param_dtype=jnp.float32, rngs=nnx.Rngs(0), **stack_kw)
    load_bert_qformer_weights(model.connector.net, connector.state_dict())
    return model


def jax_step_fn(model, batch, metrics: dict | None = None):
    """A callable running one training step (returns the loss, waiting for it). With `metrics`, the step is
    compiled ahead here and `metrics` gets 'lower_s' (trace + lower), 'compile_s' (XLA) and, after calls,
    'first' (the first step's metrics as floats)."""
    import time

    import jax

    from alm_jax.config import OptimConfig
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.step import TrainState, alm_loss, build_train_step, make_optimizer, make_schedule

    ocfg = OptimConfig(lr=1e-4, b1=0.9, b2=0.98, weight_decay=0.01, warmup_steps=0, total_steps=1000, clip_norm=1.0)
    graphdef, trainable, frozen = split_trainable(model)
    tx = make_optimizer(ocfg)
    opt_state = jax.jit(tx.init)(trainable)                 # one device: no mesh, default placement
    step_fn = build_train_step(graphdef, tx, alm_loss, schedule=make_schedule(ocfg))
    data = jax.device_put(batch)
    state = {"train": TrainState(trainable, opt_state), "i": 0}
    if metrics is not None:
        t0 = time.perf_counter()
        lowered = step_fn.lower(state["train"], frozen, data, 0)
        t1 = time.perf_counter()
        step_fn = lowered.compile()
        metrics.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)

    def step():
        state["train"], m = step_fn(state["train"], frozen, data, state["i"])
        state["i"] += 1
        if metrics is not None and "first" not in metrics:
            metrics["first"] = {k: float(v) for k, v in m.items()}
        return float(m["loss"])          # waits for the step
    return step


def compare_scan(args, argv) -> str:
    """Scanned vs unrolled layer stacks: compile and step times, output differences (see the module doc). Both
    steps stay compiled and their timed calls alternate, so a change of machine load hits both alike."""
    import os

    import jax

    whisper, connector, llm = build_torch(args)
    batch = make_batch(args.batch, args.text, args.queries, args.vocab)
    modes = (True, False)
    results, steps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for scan in modes:
            model = build_jax(whisper, connector, llm, args, tmp, scan_layers=scan, remat=args.remat)
            results[scan] = {"wall": [], "cpu": []}
            steps[scan] = jax_step_fn(model, batch, results[scan])
            del model
            steps[scan]()                                   # the first step (compared below) and a warm-up
            steps[scan]()
    for _ in range(args.repeats):
        for scan in modes:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[scan]()
            results[scan]["wall"].append(time.perf_counter() - w0)
            results[scan]["cpu"].append(time.process_time() - c0)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    s, u = results[True], results[False]
    dev = jax.devices()[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_train_step.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    total = {k: v["lower_s"] + v["compile_s"] for k, v in results.items()}
    step = {k: float(np.median(v["wall"])) for k, v in results.items()}
    lines = [f"Train step, scanned vs unrolled layer stacks (Llama {args.llm_layers}x576 vocab {args.vocab}, Whisper "
             f"4x384, Q-Former 2x384; remat {args.remat}), batch {args.batch} x {args.text} tokens + 30 s audio, "
             f"float32, {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, load average {load}. First step: "
             f"|loss diff| {abs(s['first']['loss'] - u['first']['loss']):.2e}, |grad-norm diff| "
             f"{abs(s['first']['grad_norm'] - u['first']['grad_norm']):.2e}. Steps interleaved, medians of "
             f"{args.repeats}. Command: `{cmd}`", "",
             "| layer stacks | trace + lower | XLA compile | compile total | step wall (CPU) |",
             "|---|---|---|---|---|"]
    for scan in modes:
        m = results[scan]
        lines.append(f"| {'scanned' if scan else 'unrolled'} | {m['lower_s']:.1f} s | {m['compile_s']:.1f} s | "
                     f"{total[scan]:.1f} s | {step[scan] * 1e3:.0f} ms ({float(np.median(m['cpu'])) * 1e3:.0f} ms) |")
    lines.append(f"| unrolled / scanned | | | **{total[False] / total[True]:.1f}x** | "
                 f"{step[False] / step[True]:.2f}x |")
    out = "\n".join(lines)
    print(out)
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text", type=int, default=128, help="sequence length (text + the audio slots)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--llm-layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", default="default,1",
                    help="comma-separated torch thread settings to time ('default' = torch's own choice)")
    ap.add_argument("--compare-scan", action="store_true",
                    help="time the JAX step with scanned and with unrolled layer stacks instead (no torch)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "save_dots"),
                    help="per-block rematerialization of the layer stacks (model.remat)")
    args = ap.parse_args(argv)
    if args.compare_scan:
        return compare_scan(args, argv)

    import jax
    import torch

    whisper, connector, llm = build_torch(args)
    batch = make_batch(args.batch, args.text, args.queries, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_jax(whisper, connector, llm, args, tmp, remat=args.remat)
    jax_step = jax_step_fn(model, batch)
    del model
    t0 = time.perf_counter()
    first_jax = jax_step()                                               # compile + the first step
    compile_s = time.perf_counter() - t0
    jax_step()
    t_jax = median_seconds(jax_step, args.repeats)

    default_threads = torch.get_num_threads()
    rows = []
    first_torch = None
    for setting in args.torch_threads.split(","):
        n = default_threads if setting == "default" else int(setting)
        torch.set_num_threads(n)
        whisper, connector, llm = build_torch(args)                      # the same seed: the same weights
        step = torch_step_fn(whisper, connector, llm, batch)
        loss = step()                                                    # warm-up
        first_torch = loss if first_torch is None else first_torch
        t = median_seconds(step, args.repeats)
        rows.append((f"torch eager, {n} thread{'s' if n > 1 else ''}" + (" (default)" if setting == "default" else ""), t))

    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_train_step.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    dev = jax.devices()[0]
    lines = [f"Train step, DeSTA-connector ALM (Whisper tiny.en-shaped encoder, Q-Former 2x384 with "
             f"{args.queries} queries x 2 taps, Llama {args.llm_layers}x576 vocab {args.vocab}), batch "
             f"{args.batch} x {args.text} tokens + 30 s audio, float32, {dev.platform} ({dev.device_kind}); "
             f"first-step loss JAX {first_jax:.5f} vs torch {first_torch:.5f}; JAX compile + first step "
             f"{compile_s:.1f} s. Command: `{cmd}`",
             "",
             "| implementation | step time (median of %d) | JAX / torch |" % args.repeats,
             "|---|---|---|",
             f"| JAX jit (XLA default threads) | {t_jax * 1e3:.0f} ms | |"]
    for name, t in rows:
        lines.append(f"| {name} | {t * 1e3:.0f} ms | {t_jax / t:.2f}x |")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
