"""Whether a model hears its clip: the held-out listening gap (each sample scored with the next sample's audio)
and the connector's `output_init: embeddings` (fresh audio tokens at the LLM's token-embedding scale)."""

import json

import numpy as np
import pytest

from tiny_setup import tiny_config


def _cfg(tiny, tmp_path, *extra):
    paths = json.loads((tiny / "paths.json").read_text())
    return tiny_config(paths, tmp_path, f"eval.corpus=[{paths['eval_corpus']}]", *extra)


def test_other_audio_gives_each_sample_the_next_samples_clips():
    from alm_jax.evaluation.loss import other_audio
    b, c, s = 3, 2, 5
    audio = np.arange(b * c * s, dtype=np.float32).reshape(b * c, s)
    samples = np.array([5, 4, 3, 0, 2, 1], np.int32)
    batch = {"input_ids": np.zeros((b, 7), np.int32), "audio": audio, "audio_samples": samples,
             "audio_clip": np.full((b, 7), -1, np.int32)}
    out = other_audio(batch)
    np.testing.assert_array_equal(out["audio"], np.concatenate([audio[2:], audio[:2]]))
    np.testing.assert_array_equal(out["audio_samples"], [3, 0, 2, 1, 5, 4])   # slot 1 of sample 0 is now empty
    assert out["audio_clip"] is batch["audio_clip"] and out["input_ids"] is batch["input_ids"]
    assert batch["audio"] is audio                                            # the input is left as it was


def _louder(model):
    """The tiny random LLM (init std 0.02) carries a change of audio to the answer's loss below float32
    resolution; larger token embeddings and value / output projections make the dependence measurable."""
    import jax
    from flax import nnx
    params = nnx.state(model.llm, nnx.Param)
    scale = {"embedding": 50.0, "v_proj": 20.0, "o_proj": 20.0}

    def louder(path, x):
        name = "/".join(str(p) for p in path)
        return x * next((v for k, v in scale.items() if k in name), 1.0)
    nnx.update(model.llm, jax.tree_util.tree_map_with_path(louder, params))
    return model


def test_listening_gap_is_the_loss_difference_with_swapped_audio(tiny, tmp_path):
    import jax.numpy as jnp
    from alm_jax.errors import ConfigError
    from alm_jax.evaluation import HeldOutLoss
    from alm_jax.evaluation.loss import other_audio
    from alm_jax.training.step import alm_loss
    from alm_jax.weights.alm_params import build_alm
    cfg = _cfg(tiny, tmp_path)
    model = _louder(build_alm(cfg.model, seed=cfg.seed))
    plain = HeldOutLoss(cfg, cfg.eval.corpus, batches=1, batch_size=4).run(model)
    scorer = HeldOutLoss(cfg, cfg.eval.corpus, batches=1, batch_size=4, listening_gap=True)
    gap = scorer.run(model)
    assert gap.keys() == {"eval/loss", "eval/loss_other_audio", "eval/listening_gap"}
    assert gap["eval/loss"] == plain["eval/loss"]
    assert gap["eval/listening_gap"] == pytest.approx(gap["eval/loss_other_audio"] - gap["eval/loss"], abs=1e-9)
    assert abs(gap["eval/listening_gap"]) > 1e-5     # the answers depend on the clip they follow

    it = scorer.data.iterator()                      # the same batch, scored by hand with the next sample's audio
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    it.close()
    total, tokens, _ = alm_loss(model, other_audio(batch))
    assert gap["eval/loss_other_audio"] == pytest.approx(float(total / tokens), rel=1e-5)
    with pytest.raises(ConfigError, match="listening_gap"):
        HeldOutLoss(cfg, cfg.eval.corpus, batches=1, batch_size=1, listening_gap=True)


def _token_and_embedding_rms(model, n=4, seconds=0.5):
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.standard_normal((n, int(16000 * seconds))).astype(np.float32) * 0.1)
    tokens = np.asarray(model.audio_tokens(audio, jnp.full((n,), audio.shape[1], jnp.int32)))
    table = np.asarray(model.llm.embed_tokens.embedding[...], np.float32)
    return float(np.sqrt(np.mean(tokens ** 2))), float(np.sqrt(np.mean(table ** 2)))


def test_output_init_embeddings_starts_audio_tokens_at_the_embedding_scale(tiny, tmp_path):
    from alm_jax.weights.alm_params import build_alm
    default = build_alm(_cfg(tiny, tmp_path).model, seed=0)
    scaled = build_alm(_cfg(tiny, tmp_path, "model.connector.output_init=embeddings").model, seed=0)
    tok_default, emb = _token_and_embedding_rms(default)
    tok_scaled, emb_again = _token_and_embedding_rms(scaled)
    assert emb == emb_again
    assert abs(tok_scaled / emb - 1) < 0.25, (tok_scaled, emb)     # LayerNorm output x kernel std * sqrt(in)
    assert tok_default / emb > 2, (tok_default, emb)               # what it corrects: default tokens are larger
    assert float(np.abs(np.asarray(scaled.connector.net.proj.bias[...])).max()) == 0.0


def test_output_init_embeddings_needs_one_output_projection(tiny, tmp_path):
    from alm_jax.errors import ConfigError
    from alm_jax.weights.alm_params import build_alm
    cfg = _cfg(tiny, tmp_path, "model.connector.kind=alarm", "model.connector.output_init=embeddings")
    with pytest.raises(ConfigError, match="output_init"):
        build_alm(cfg.model, seed=0)
