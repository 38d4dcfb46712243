"""`alm export --format bundle` / `alm import`: a LoRA + Q-Former run comes back with identical logits (from the
referenced and from the copied frozen models, and through `alm import --out` as a checkpoint), the model card
carries the run's numbers, a bundle that does not fit its config is refused naming the key, and formats that
cannot express a run refuse it naming those that can."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_alm import clips, make_batch

from tiny_setup import tiny_config


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    """A tiny desta + LoRA run with random (non-zero) trained weights, checkpointed at step 7, with a logged eval."""
    from alm_jax.config import to_dict
    from alm_jax.models.lora import lora_layers
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(paths, root, "model.lora.rank=2", "model.lora.alpha=4")
    model = build_alm(cfg.model, seed=cfg.seed)
    r = np.random.default_rng(0)
    for _, layer in lora_layers(model):
        layer.lora_b.set_value(jnp.asarray(0.05 * r.standard_normal(layer.lora_b.shape), jnp.float32))
    save_trained(model, cfg.checkpoint.dir, 7, to_dict(cfg))
    (root / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/loss": 3.25}) + "\n"
                                        + json.dumps({"step": 7, "eval/loss": 2.5, "eval/hallucination/accuracy": 61.5})
                                        + "\n")
    return cfg, paths


def _logits(model, seq_len=16):
    batch = make_batch(model, clips(2), [[10, 11, 12], [13, 14]], seq_len=seq_len)
    return np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))


def test_bundle_round_trip(run_dir, tmp_path):
    from alm_jax.cli import main
    from alm_jax.export.bundle import load_bundle
    from alm_jax.export.source import load_run
    cfg, _ = run_dir
    run = load_run(cfg.checkpoint.dir)
    want = _logits(run.model)
    assert main(["export", cfg.checkpoint.dir, "--format", "bundle", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["step"] == 7 and not meta["base_copied"]
    _, model, step = load_bundle(tmp_path / "b")
    assert step == 7 and np.array_equal(_logits(model), want)
    card = (tmp_path / "b" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: alm_jax")
    assert "| eval/loss | 2.5000 |" in card and "| eval/hallucination/accuracy | 61.5000 |" in card
    assert "Records: 48" in card and "test (48)" in card and "rank 2" in card and "Step exported: 7" in card
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()
    # alm import --out: a checkpoint that load_run (alm eval / alm export) reads, same logits
    assert main(["import", str(tmp_path / "b"), "--out", str(tmp_path / "ckpt")]) == 0
    again = load_run(tmp_path / "ckpt")
    assert again.step == 7 and np.array_equal(_logits(again.model), want)


def test_bundle_with_copied_base_and_sharded_weights(run_dir, tmp_path):
    from alm_jax.export.bundle import load_bundle
    from alm_jax.export.formats import export
    from alm_jax.export.source import load_run
    cfg, _ = run_dir
    run = load_run(cfg.checkpoint.dir)
    files = export(run, "bundle", tmp_path / "b", max_shard_bytes=20_000, copy_base=True)
    assert "trainable.safetensors.index.json" in files and sum(f.startswith("trainable-") for f in files) > 1
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "b", moved)          # copied base: the bundle is self-contained
    meta = json.loads((moved / "bundle.json").read_text())
    assert meta["base"] == {"llm": "base/llm", "encoders": ["base/encoder-0"]}
    _, model, _ = load_bundle(moved)
    assert np.array_equal(_logits(model), _logits(run.model))


def test_bundle_refuses_what_does_not_fit(run_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from alm_jax.errors import CheckpointError, ConfigError
    from alm_jax.export.bundle import load_bundle
    from alm_jax.export.formats import export
    from alm_jax.export.source import load_run
    cfg, _ = run_dir
    export(load_run(cfg.checkpoint.dir), "bundle", tmp_path / "b")
    path = tmp_path / "b" / "trainable.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][..., :1]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " has shape"):
        load_bundle(tmp_path / "b")
    del tensors[name]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match="not an alm_jax bundle"):
        load_bundle(tmp_path)


def test_formats_refuse_what_they_cannot_express(run_dir, tmp_path):
    from alm_jax.errors import ConfigError
    from alm_jax.export.formats import export
    from alm_jax.export.source import load_run
    cfg, _ = run_dir
    run = load_run(cfg.checkpoint.dir)
    with pytest.raises(ConfigError, match="qwen2-audio.*Formats that can: llm, peft, bundle"):
        export(run, "qwen2-audio", tmp_path / "q")
    with pytest.raises(ConfigError, match="choose one of"):
        export(run, "onnx", tmp_path / "o")


def test_bundle_and_import_keep_batchnorm_statistics(tiny, tmp_path):
    """An ALARM adapter with BatchNorm: the running statistics are part of what a run learned, so the bundle
    carries them, `alm import --out` writes them back, and every reader serves in eval mode (same logits)."""
    from alm_jax.cli import main
    from alm_jax.config import to_dict
    from alm_jax.export.bundle import load_bundle
    from alm_jax.export.source import load_run
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    paths = json.loads((tiny / "paths.json").read_text())
    cfg = tiny_config(paths, tmp_path / "run", "model.connector.kind=alarm", "model.connector.adapter_dim=16",
                      "model.connector.norm=batch", "model.encoders.0.tap_indexing=hf")
    model = build_alm(cfg.model, seed=cfg.seed)
    r = np.random.default_rng(1)
    stats = nnx.state(model, nnx.BatchStat)
    for _, var in nnx.to_flat_state(stats):
        var.set_value(jnp.asarray(0.5 + r.random(var.shape), jnp.float32))
    save_trained(model, cfg.checkpoint.dir, 3, to_dict(cfg))
    run = load_run(cfg.checkpoint.dir)
    flat = lambda m: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.BatchStat))}  # noqa
    want_stats, want = flat(model), _logits(run.model, 48)
    assert len(want_stats) == 4 and all(np.array_equal(flat(run.model)[k], v) for k, v in want_stats.items())
    assert main(["export", cfg.checkpoint.dir, "--format", "bundle", "--out", str(tmp_path / "b")]) == 0
    _, bundled, _ = load_bundle(tmp_path / "b")
    assert all(np.array_equal(flat(bundled)[k], v) for k, v in want_stats.items())
    assert np.array_equal(_logits(bundled, 48), want)
    assert main(["import", str(tmp_path / "b"), "--out", str(tmp_path / "ckpt")]) == 0
    assert np.array_equal(_logits(load_run(tmp_path / "ckpt").model, 48), want)
