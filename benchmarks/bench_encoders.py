"""Time the frozen-encoder additions on 30 s of audio: JAX jit vs `transformers` torch eager, same weights.

    .venv/bin/python benchmarks/bench_encoders.py [--w2v-layers 2] [--threads 2,default] [--repeats 5]

Rows (markdown, one per encoder part and torch thread setting):
- Whisper decoder step: one greedy token with a KV cache (prompt + `--context` tokens already in it) and
  cross-attention to 1500 encoder positions; tiny.en shape (d 384, 4 layers, 6 heads, vocab 51864), random.
- W2V-BERT forward: `Wav2Vec2BertModel` on 30 s (1500 stacked fbank frames), real width (d 1024, 16 heads,
  FFN 4096, relative_key positions) with `--w2v-layers` layers (24 in facebook/w2v-bert-2.0), random.
- W2V-BERT features: `w2v_bert_features` (JAX) vs `SeamlessM4TFeatureExtractor` (numpy) on 30 s.
JAX uses every CPU core XLA sees; torch runs with each `--threads` setting (`default` = torch's own choice).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from _timing import median_seconds

SR = 16000


def _row(name: str, t_jax: float, t_ref: float, diff: float, ref: str, cmd: str) -> str:
    dev = jax.devices()[0]
    return (f"| {name} | JAX jit {t_jax * 1e3:.1f} ms | {ref} {t_ref * 1e3:.1f} ms | "
            f"{t_ref / t_jax:.2f}x | max diff {diff:.1e} | {dev.platform} ({dev.device_kind}) | `{cmd}` |")


def bench_decoder_step(args, thread_settings, cmd) -> list[str]:
    import torch
    from flax import nnx
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from alm_jax.weights.whisper_params import load_whisper_decoder

    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=384, encoder_layers=1, encoder_attention_heads=6,
                        encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
                        vocab_size=51864, max_source_positions=1500, max_target_positions=448)
    hf = WhisperForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        dec = load_whisper_decoder(tmp)
    rng = np.random.default_rng(0)
    enc = rng.standard_normal((1, 1500, 384)).astype(np.float32)
    ctx = rng.integers(0, 50000, (1, args.context)).astype(np.int32)
    tok = np.array([[123]], np.int32)

    graphdef, state = nnx.split(dec)
    prefill = jax.jit(lambda st, e, ids: nnx.merge(graphdef, st)(ids, cache=nnx.merge(graphdef, st).init_cache(
        e, args.context + 8)))
    step = jax.jit(lambda st, ids, cache: nnx.merge(graphdef, st)(ids, cache=cache)[0])
    _, cache = prefill(state, jnp.asarray(enc), jnp.asarray(ctx))
    run_jax = lambda: step(state, jnp.asarray(tok), cache).block_until_ready()  # noqa: E731

    enc_t, ctx_t, tok_t = torch.from_numpy(enc), torch.from_numpy(ctx).long(), torch.from_numpy(tok).long()
    with torch.no_grad():
        past = EncoderDecoderCache(DynamicCache(), DynamicCache())
        hf(encoder_outputs=(enc_t,), decoder_input_ids=ctx_t, past_key_values=past, use_cache=True)

    def run_torch():
        with torch.no_grad():
            out = hf(encoder_outputs=(enc_t,), decoder_input_ids=tok_t, past_key_values=past, use_cache=True).logits
        past.self_attention_cache.crop(-1)   # drop the new token: the same context length for every call
        return out

    diff = float(np.abs(np.asarray(run_jax())[0, -1] - run_torch().numpy()[0, -1]).max())
    rows = []
    t_jax = median_seconds(run_jax, args.repeats * 4)
    for threads in thread_settings:
        torch.set_num_threads(threads)
        run_torch()
        t_torch = median_seconds(run_torch, args.repeats * 4)
        rows.append(_row(f"Whisper decoder step (tiny.en shape, {args.context} tokens cached, 1500 encoder "
                         f"positions), float32", t_jax, t_torch, diff, f"torch eager ({threads} threads)", cmd))
    return rows


def bench_w2v_bert(args, thread_settings, cmd) -> list[str]:
    import torch
    from flax import nnx
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    from alm_jax.audio.fbank import w2v_bert_features
    from alm_jax.weights.w2v_bert_params import load_w2v_bert

    torch.manual_seed(0)
    cfg = Wav2Vec2BertConfig(num_hidden_layers=args.w2v_layers)
    hf = Wav2Vec2BertModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_w2v_bert(tmp)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(30 * SR)).astype(np.float32)
    extractor = SeamlessM4TFeatureExtractor()
    ref = extractor(audio, sampling_rate=SR, return_tensors="np")
    feats_np = ref["input_features"]

    feats_fn = jax.jit(w2v_bert_features)
    run_feats_jax = lambda: feats_fn(audio[None])[0].block_until_ready()  # noqa: E731
    run_feats_np = lambda: extractor(audio, sampling_rate=SR, return_tensors="np")  # noqa: E731
    f_diff = float(np.abs(np.asarray(run_feats_jax()) - feats_np).max())

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).last_hidden_state)
    x = jnp.asarray(feats_np)
    run_jax = lambda: forward(state, x).block_until_ready()  # noqa: E731
    x_t = torch.from_numpy(feats_np)

    def run_torch():
        with torch.no_grad():
            return hf(x_t).last_hidden_state

    diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())
    t_jax = median_seconds(run_jax, args.repeats)
    t_feats = median_seconds(run_feats_jax, args.repeats)
    t_feats_np = median_seconds(run_feats_np, args.repeats)
    rows = [_row("W2V-BERT input features, 30 s (fbank, float32 JAX vs float64 numpy)", t_feats, t_feats_np,
                 f_diff, "SeamlessM4TFeatureExtractor", cmd)]
    for threads in thread_settings:
        torch.set_num_threads(threads)
        run_torch()
        t_torch = median_seconds(run_torch, args.repeats)
        rows.append(_row(f"W2V-BERT forward, 30 s = {feats_np.shape[1]} frames, d 1024 x {args.w2v_layers} layers "
                         f"(relative_key), float32", t_jax, t_torch, diff, f"torch eager ({threads} threads)", cmd))
    return rows


def bench_clap(args, thread_settings, cmd) -> list[str]:
    """CLAP's audio tower on 30 s of audio: the fused checkpoint layout (laion/clap-htsat-fused shape, random
    weights) sees a clip over its 10 s window as 4 channels (the whole clip shrunk + 3 crops, is_longer);
    `--clap-depths` sets the Swin stage depths (HF default 2,2,6,2). Plus the input features: ours on device
    from 16 kHz (resample x3 + repeat-pad + mel, a 10 s clip) vs ClapFeatureExtractor on the 48 kHz clip."""
    import scipy.signal
    import torch
    from flax import nnx
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel

    from alm_jax.audio.clap_device import clap_features_16k
    from alm_jax.audio.clap_features import ClapFeatureSettings
    from alm_jax.weights.clap_params import load_clap

    torch.manual_seed(0)
    depths = [int(d) for d in args.clap_depths.split(",")]
    cfg = ClapConfig(audio_config=ClapAudioConfig(enable_fusion=True, fusion_type="aff_2d", depths=depths))
    hf = ClapModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_clap(tmp)
    rng = np.random.default_rng(0)
    audio48 = (0.1 * rng.standard_normal(30 * 48000)).astype(np.float32)
    extractor = ClapFeatureExtractor(truncation="fusion")
    np.random.seed(0)
    ref = extractor(audio48, sampling_rate=48000, return_tensors="np")
    feats, longer = ref["input_features"], ref["is_longer"]

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x, lg: nnx.merge(graphdef, st).audio_embeds(x, lg))
    x, lg = jnp.asarray(feats), jnp.asarray(longer)
    run_jax = lambda: forward(state, x, lg).block_until_ready()  # noqa: E731
    x_t, lg_t = torch.from_numpy(feats), torch.from_numpy(longer)

    def run_torch():
        with torch.no_grad():
            out = hf.get_audio_features(x_t, is_longer=lg_t)
        out = getattr(out, "pooler_output", out)
        return out / out.norm(dim=-1, keepdim=True)

    diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())
    t_jax = median_seconds(run_jax, args.repeats)

    clip16 = (0.1 * rng.standard_normal(10 * SR)).astype(np.float32)
    settings = ClapFeatureSettings(truncation="fusion")
    dev = jax.jit(lambda a, n: clap_features_16k(a, n, settings, fused=True))
    run_feats_jax = lambda: dev(clip16[None], np.array([clip16.size])).block_until_ready()  # noqa: E731
    clip48 = scipy.signal.resample_poly(clip16.astype(np.float64), 3, 1)
    run_feats_hf = lambda: extractor(clip48, sampling_rate=48000, return_tensors="np")  # noqa: E731
    f_diff = float(np.abs(np.asarray(run_feats_jax())[0] - run_feats_hf()["input_features"][0]).max())
    t_feats = median_seconds(run_feats_jax, args.repeats)
    t_feats_hf = median_seconds(run_feats_hf, args.repeats)
    rows = [_row("CLAP input features, 10 s (ours: 16 kHz on device incl. x3 resampling; HF: the 48 kHz clip)",
                 t_feats, t_feats_hf, f_diff, "ClapFeatureExtractor (numpy, no resampling)", cmd)]
    for threads in thread_settings:
        torch.set_num_threads(threads)
        run_torch()
        t_torch = median_seconds(run_torch, args.repeats)
        rows.append(_row(f"CLAP audio tower + projection, 30 s fused (4 x 1001 frames), HTSAT depths {depths}, "
                         "float32", t_jax, t_torch, diff, f"torch eager ({threads} threads)", cmd))
    return rows


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w2v-layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=32, help="tokens already in the decoder's cache")
    ap.add_argument("--threads", default="2,default", help="torch thread settings, comma separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clap-depths", default="2,2,6,2", help="CLAP HTSAT stage depths")
    ap.add_argument("--only", choices=("decoder", "w2v_bert", "clap"), default=None)
    args = ap.parse_args(argv)

    import torch
    default = torch.get_num_threads()
    thread_settings = [default if t == "default" else int(t) for t in args.threads.split(",")]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_encoders.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    rows = []
    if args.only in (None, "decoder"):
        rows += bench_decoder_step(args, thread_settings, cmd)
    if args.only in (None, "w2v_bert"):
        rows += bench_w2v_bert(args, thread_settings, cmd)
    if args.only in (None, "clap"):
        rows += bench_clap(args, thread_settings, cmd)
    torch.set_num_threads(default)
    for row in rows:
        print(row)
    return rows


if __name__ == "__main__":
    main()
