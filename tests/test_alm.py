"""The audio-language model: span counts per connector, splicing of several clips, trainable/frozen split,
and a tiny ALM overfitting a batch for every connector kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax.audio.features import log_mel
from alm_jax.config import ConnectorConfig, EncoderConfig, OptimConfig
from alm_jax.models.alm import AudioLanguageModel, split_trainable
from alm_jax.models.llm import DecoderLM, LLMConfig
from alm_jax.models.stack import stack_of, stacks, unstack
from alm_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig
from alm_jax.training.step import TrainState, build_train_step, make_optimizer, masked_cross_entropy

SR = 16000
VOCAB = 64


def tiny_llm(seed=0, **stack_kw):
    cfg = LLMConfig.from_hf({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False})
    return DecoderLM(cfg, rngs=nnx.Rngs(seed), **stack_kw)


def tiny_encoder(d=32, seed=1, scan_layers=True):
    cfg = WhisperEncoderConfig(num_mel_bins=80, d_model=d, encoder_layers=2, encoder_attention_heads=4,
                               encoder_ffn_dim=2 * d, max_source_positions=100)
    enc = WhisperEncoder(cfg, rngs=nnx.Rngs(seed), scan_layers=scan_layers)
    # A random encoder's output is dominated by its sinusoidal positions; damp them so that, like a
    # pretrained encoder, its features tell different sounds apart.
    enc.embed_positions[...] = 0.0 * enc.embed_positions[...]
    return enc


CONNECTORS = {
    "desta": ConnectorConfig(kind="desta", num_queries=4, num_layers=1, num_heads=4, hidden=32, intermediate=64),
    "alarm": ConnectorConfig(kind="alarm", adapter_dim=32),
    "alarm_ca": ConnectorConfig(kind="alarm_ca", adapter_dim=32, fusion_layers=(1,), fusion_heads=4, hidden=32,
                                adapters=("batch", "layer")),   # ALARM-CA's: BatchNorm main, LayerNorm second
    "alarm_p": ConnectorConfig(kind="alarm_p", adapter_dim=32, perceiver_dim=32, perceiver_heads=4,
                               perceiver_cross_heads=4, perceiver_blocks=1, perceiver_block_layers=1,
                               perceiver_latents=3),
    "mats": ConnectorConfig(kind="mats", mapper_tokens=4, num_layers=1, num_heads=4, hidden=32),
}


def make_model(kind, seed=0, scan_layers=True, remat="none"):
    n_enc = 2 if kind in ("alarm_ca", "alarm_p") else 1
    encs = [tiny_encoder(d=32 if i == 0 else 48, seed=1 + i, scan_layers=scan_layers) for i in range(n_enc)]
    tap_idx = "blocks" if kind == "desta" else "hf"
    ecfgs = [EncoderConfig(taps=(0, -1) if tap_idx == "blocks" else (1, 2), tap_indexing=tap_idx, pad_to_seconds=None)
             for _ in encs]
    stack_kw = dict(scan_layers=scan_layers, remat=remat)
    return AudioLanguageModel(encs, tiny_llm(seed, **stack_kw), CONNECTORS[kind], ecfgs, rngs=nnx.Rngs(seed + 10),
                              **stack_kw)


def make_batch(model, waves, texts, seq_len=32):
    """One clip per row at the start of the sequence, then the target text tokens."""
    S = max(len(w) for w in waves)
    counts = [model.num_audio_tokens(len(w)) for w in waves]
    B = len(waves)
    ids = np.zeros((B, seq_len), np.int32)
    clip = -np.ones((B, seq_len), np.int32)
    pos = -np.ones((B, seq_len), np.int32)
    tgt = np.zeros((B, seq_len), np.int32)
    mask = np.zeros((B, seq_len), np.float32)
    att = np.zeros((B, seq_len), np.int32)
    audio = np.zeros((B, S), np.float32)
    for b, (w, t, n) in enumerate(zip(waves, texts, counts)):
        audio[b, :len(w)] = w
        clip[b, :n], pos[b, :n] = 0, np.arange(n)
        seq = [1] * n + list(t)
        ids[b, :len(seq)] = seq
        tgt[b, :len(seq) - 1] = seq[1:]
        mask[b, n - 1:len(seq) - 1] = 1.0
        att[b, :len(seq)] = 1
    return {k: jnp.asarray(v) for k, v in dict(input_ids=ids, audio_clip=clip, audio_pos=pos, targets=tgt, loss_mask=mask,
                                                attention_mask=att, audio=audio,
                                                audio_samples=np.array([len(w) for w in waves], np.int32)).items()}


def clips(n, seed=0, seconds=0.5):
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    return [(0.3 * np.sin(2 * np.pi * 150 * 1.6 ** i * t) + 0.05 * r.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


def test_token_counts():
    n = int(SR * 0.5)   # 50 mel frames -> 25 encoder positions
    frames = 25
    alarm = make_model("alarm")
    assert alarm.num_audio_tokens(n) == frames // 2 + 2
    odd = int(SR * 0.49)  # 49 mel frames -> 25 positions; ALARM's T // 2 drops the odd one
    assert alarm.num_audio_tokens(odd) == 12 + 2
    assert alarm.num_audio_tokens(200) == 1 + 2   # 1 position: at least one token
    assert make_model("desta").num_audio_tokens(n) == 4
    assert make_model("mats").num_audio_tokens(n) == 4
    ca = make_model("alarm_ca")
    assert ca.num_audio_tokens(n) == alarm.num_audio_tokens(n)           # two Whisper streams: the same length
    p = make_model("alarm_p")
    assert p.num_audio_tokens(n) - alarm.num_audio_tokens(n) == 3 * 1 + 2  # latents x conditional encoders + 2
    for kind in CONNECTORS:
        m = make_model(kind)
        w = jnp.asarray(np.stack(clips(2)))
        tok = m.audio_tokens(w, jnp.array([n, n]))
        assert tok.shape[0] == 2 and tok.shape[2] == 128
        assert tok.shape[1] >= m.num_audio_tokens(n)


def test_multi_audio_splice_positions_and_causality():
    model = make_model("alarm")
    waves = [clips(1, 1, 0.3)[0], clips(1, 2, 0.5)[0], clips(1, 3, 0.4)[0]]
    counts = [model.num_audio_tokens(len(w)) for w in waves]
    S = max(len(w) for w in waves)
    audio = np.zeros((3, S), np.float32)
    for i, w in enumerate(waves):
        audio[i, :len(w)] = w
    # one row: [t t] clip0 [t] clip1 [t t] clip2 [t t]
    ids, clip, pos = [5, 6], [-1, -1], [-1, -1]
    starts = []
    for c, n in enumerate(counts):
        starts.append(len(ids))
        ids += [1] * n
        clip += [c] * n
        pos += list(range(n))
        ids += [7, 8][: 1 + (c % 2)]
        clip += [-1] * (1 + (c % 2))
        pos += [-1] * (1 + (c % 2))
    T = len(ids)
    batch = {"input_ids": jnp.asarray([ids]), "audio_clip": jnp.asarray([clip]), "audio_pos": jnp.asarray([pos]),
             "attention_mask": jnp.ones((1, T), jnp.int32),
             "audio": jnp.asarray(audio), "audio_samples": jnp.asarray([len(w) for w in waves])}
    emb = model.embed_inputs(batch)[0]
    tokens = model.audio_tokens(batch["audio"], batch["audio_samples"])
    for c, (s, n) in enumerate(zip(starts, counts)):
        np.testing.assert_array_equal(np.asarray(emb[s:s + n]), np.asarray(tokens[c, :n]))
    text = model.llm.embed(batch["input_ids"])[0]
    is_text = np.asarray(batch["audio_clip"][0]) < 0
    np.testing.assert_array_equal(np.asarray(emb)[is_text], np.asarray(text)[is_text])
    # swapping clips 1 and 2 (different lengths) changes logits only from clip 1's span on
    logits = model(batch)[0]
    swapped_waves = [waves[0], waves[2], waves[1]]
    counts2 = [model.num_audio_tokens(len(w)) for w in swapped_waves]
    ids2, clip2, pos2 = [5, 6], [-1, -1], [-1, -1]
    for c, n in enumerate(counts2):
        ids2 += [1] * n
        clip2 += [c] * n
        pos2 += list(range(n))
        ids2 += [7, 8][: 1 + (c % 2)]
        clip2 += [-1] * (1 + (c % 2))
        pos2 += [-1] * (1 + (c % 2))
    audio2 = audio[[0, 2, 1]]
    batch2 = {**batch, "input_ids": jnp.asarray([ids2]), "audio_clip": jnp.asarray([clip2]), "audio_pos": jnp.asarray([pos2]),
              "attention_mask": jnp.ones((1, len(ids2)), jnp.int32), "audio": jnp.asarray(audio2),
              "audio_samples": jnp.asarray([len(w) for w in swapped_waves])}
    logits2 = model(batch2)[0]
    first = starts[1]
    np.testing.assert_allclose(np.asarray(logits[:first]), np.asarray(logits2[:first]), atol=1e-6)
    # (the span opens with the shared learned start embedding, so the first differing logit is inside it)
    assert np.abs(np.asarray(logits[first:first + 3]) - np.asarray(logits2[first:first + 3])).max() > 1e-4


def loss_fn(model, batch):
    s, n = masked_cross_entropy(model(batch), batch["targets"], batch["loss_mask"])
    return s, n, {}


def test_one_step_changes_only_connector_and_frozen_have_no_optimizer_state():
    model = make_model("desta")
    graphdef, trainable, frozen = split_trainable(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    assert paths and all(p.startswith("connector.") for p in paths)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10))
    opt = tx.init(trainable)
    step = build_train_step(graphdef, tx, loss_fn, donate=False)
    batch = make_batch(model, clips(4), [[10, 11, 12]] * 4)
    before_frozen = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    before_train = [np.asarray(x) for x in jax.tree.leaves(trainable)]
    st, m = step(TrainState(trainable, opt), frozen, batch, 0)
    new_t, new_opt = st.trainable, st.opt_state
    for a, b in zip(before_frozen, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    changed = sum(not np.array_equal(a, np.asarray(b)) for a, b in zip(before_train, jax.tree.leaves(new_t)))
    assert changed == len(before_train)
    moments = [x for x in jax.tree.leaves(new_opt) if x.ndim > 0]
    assert len(moments) == 2 * len(before_train)   # adam mu + nu for trainable leaves only


def _per_layer(model, tree) -> dict[str, np.ndarray]:
    """The leaves of `tree` (a state of `model`) by per-layer name (scanned stacks unstacked), as numpy."""
    found = stacks(model)
    return {".".join(map(str, p)): np.asarray(v) for path, var in nnx.to_flat_state(tree)
            for p, v in unstack(tuple(path), var[...], found)}


def test_scanned_stacks_give_the_unrolled_loss_and_gradients():
    """LLM, Whisper encoder and Q-Former scanned (and rematerialized: remat="full") or unrolled, with the same
    weights: the same loss and connector gradients from a train step's value_and_grad."""
    unrolled = make_model("desta", scan_layers=False)
    scanned = make_model("desta", scan_layers=True, remat="full")
    assert scanned.llm.layers.mlp.up_proj.kernel.shape[0] == 2                 # stacked [layers, ...]
    assert scanned.connector.net.qformer.layer.out_norm.scale.ndim == 2
    weights = _per_layer(unrolled, nnx.state(unrolled, nnx.Param))
    found = stacks(scanned)
    for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):      # copy the unrolled weights in
        names = [".".join(map(str, p)) for p, _ in unstack(tuple(path), var[...], found)]
        var.set_value(np.stack([weights[n] for n in names]) if stack_of(tuple(path), found) else weights[names[0]])
    batch = make_batch(unrolled, clips(2), [[10, 11, 12]] * 2)

    def loss_and_grads(model):
        graphdef, trainable, frozen = split_trainable(model)

        def f(t):
            s, n, _ = loss_fn(nnx.merge(graphdef, t, frozen), batch)
            return s / n
        loss, grads = jax.jit(jax.value_and_grad(f))(trainable)
        return float(loss), _per_layer(model, grads)

    (want_loss, want), (loss, got) = loss_and_grads(unrolled), loss_and_grads(scanned)
    assert abs(loss - want_loss) <= 1e-5 and got.keys() == want.keys()
    assert "connector.net.qformer.layer.0.intermediate.kernel" in got
    for name, g in got.items():
        assert np.abs(g - want[name]).max() <= 1e-5 * max(1.0, np.abs(want[name]).max()), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONNECTORS))
def test_tiny_alm_overfits_a_batch(kind):
    losses = overfit(make_model(kind))
    assert losses[-1] < 0.05, f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"


def overfit(model, max_steps: int = 300) -> list[float]:
    """Train `model`'s connector on one batch of 8 clips -> their own 4-token texts until the loss is < 0.05
    (or `max_steps`); the per-step losses."""
    graphdef, trainable, frozen = split_trainable(model)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=10, total_steps=300, weight_decay=0.0, clip_norm=1.0))
    opt = tx.init(trainable)
    step = build_train_step(graphdef, tx, loss_fn)
    r = np.random.default_rng(0)
    texts = [list(r.integers(10, VOCAB, 4)) for _ in range(8)]
    batch = make_batch(model, clips(8, seed=3), texts)
    losses = []
    for i in range(max_steps):
        st, m = step(TrainState(trainable, opt), frozen, batch, i)
        trainable, opt = st.trainable, st.opt_state
        losses.append(float(m["loss"]))
        if losses[-1] < 0.05:
            break
    return losses


def test_generate_with_cache_equals_full_recomputation():
    from alm_jax.models.alm import generate
    model = make_model("alarm")
    waves = [clips(1, 5, 0.3)[0], clips(1, 6, 0.5)[0]]
    S = max(len(w) for w in waves)
    rows = []
    for b, w in enumerate(waves):
        n = model.num_audio_tokens(len(w))
        rows.append(([3, 4] + [1] * n + [5] * (b + 1), [-1, -1] + list(range(n)) + [-1] * (b + 1)))
    T = max(len(r[0]) for r in rows)
    ids = np.zeros((2, T), np.int32); pos = -np.ones((2, T), np.int32); att = np.zeros((2, T), np.int32)
    for b, (i, p) in enumerate(rows):          # left padding
        ids[b, T - len(i):], pos[b, T - len(i):], att[b, T - len(i):] = i, p, 1
    clip = np.where(pos >= 0, 0, -1).astype(np.int32)   # each row's own clip 0
    audio = np.zeros((2, S), np.float32)
    for b, w in enumerate(waves):
        audio[b, :len(w)] = w
    batch = {"input_ids": jnp.asarray(ids), "audio_clip": jnp.asarray(clip), "audio_pos": jnp.asarray(pos),
             "attention_mask": jnp.asarray(att),
             "audio": jnp.asarray(audio), "audio_samples": jnp.asarray([len(w) for w in waves], jnp.int32)}
    out = np.asarray(generate(model, batch, max_new_tokens=6))
    cur = dict(batch)
    for step in range(6):
        nxt = np.asarray(jnp.argmax(model(cur)[:, -1], -1))
        np.testing.assert_array_equal(nxt, out[:, step])
        cur = {**cur, "input_ids": jnp.concatenate([cur["input_ids"], jnp.asarray(nxt[:, None], jnp.int32)], 1),
               "audio_clip": jnp.concatenate([cur["audio_clip"], -jnp.ones((2, 1), jnp.int32)], 1),
               "audio_pos": jnp.concatenate([cur["audio_pos"], -jnp.ones((2, 1), jnp.int32)], 1),
               "attention_mask": jnp.concatenate([cur["attention_mask"], jnp.ones((2, 1), jnp.int32)], 1)}


def test_encoder_runs_only_the_blocks_its_taps_read():
    """A tap list that stops early: the Whisper blocks past the deepest tapped one do not run (their entries are
    None), for "blocks" and for "hf" indexing (hf entry t is block t - 1; entry 0 the embeddings)."""
    waves = jnp.asarray(np.stack(clips(2)))
    enc = tiny_encoder()
    for taps, indexing, blocks in (((0,), "blocks", (0,)), ((0, 1), "hf", (0,))):
        model = AudioLanguageModel([enc], tiny_llm(), CONNECTORS["alarm"],
                                   [EncoderConfig(taps=taps, tap_indexing=indexing, pad_to_seconds=None)],
                                   rngs=nnx.Rngs(1))
        assert model.tapped_blocks(0) == blocks
        states = model.encoder_states(0, waves)
        assert len(states) == (2 if indexing == "blocks" else 3) and states[-1] is None
        full = enc(log_mel(waves, n_mels=80, pad_to_seconds=None))
        want = full.block_outputs if indexing == "blocks" else full.hidden_states
        for t in taps:
            np.testing.assert_allclose(np.asarray(states[t]), np.asarray(want[t]), atol=1e-6)
