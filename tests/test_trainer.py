"""The training loop: exact resume after kill -9 (evals included), SIGTERM checkpoint, equal losses across mesh
shapes, checkpoint restore onto another mesh, the non-finite guard, held-out evals, the global-batch layout
(the same batches for any process count), FLOP accounting, and clear config errors."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_setup import tiny_config

HERE = Path(__file__).parent
ROOT = HERE.parent


def run(tiny, run_dir, action="none", *overrides, devices=1, expect_rc=0):
    out = run_dir.parent / f"{run_dir.name}-{action.replace(':', '')}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    r = subprocess.run([sys.executable, str(HERE / "run_tiny_train.py"), str(tiny / "paths.json"), str(run_dir),
                        str(out), action, *overrides], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == expect_rc, r.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("losses", "eval_losses"):
        result[key] = {int(k): v for k, v in result.get(key, {}).items()}
    return result


def _paths(tiny) -> dict:
    return json.loads((tiny / "paths.json").read_text())


def _evals(tiny, every=5, batches=2) -> list[str]:
    return [f"eval.corpus=[{_paths(tiny)['eval_corpus']}]", f"eval.every={every}", f"eval.batches={batches}"]


def _state(ckpt_dir: Path, step: int) -> dict:
    """A saved {'trainable', 'opt_state'} as nested dicts of numpy arrays."""
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(ckpt_dir / str(step) / "state")


def _same_tree(a, b) -> bool:
    import jax
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb))


# Per-step losses and held-out losses of the tiny run below, recorded at commit 59a2b91 (before the
# architecture refactor of issue 9) and re-recorded once when the loss began applying the vocabulary head
# block by block (training/loss.py: same step-1 loss, a different summation order moves later steps by
# <= 4e-6). Restructuring must not change a bit of them. One exception: the step-1 loss alone came out one
# float32 ulp higher (10.831927299) at the same commit on two machines with the same package versions, while
# every later step, the held-out losses and the trained weights stayed bit-equal (Adam's first step is
# ~lr * sign(g), so an ulp in step 1 does not reach the weights) - an environment effect, not a code change,
# so step 1 is held to one ulp.
PINNED_LOSSES = {1: 10.831926345825195, 2: 10.811976432800293, 3: 10.809624671936035, 4: 10.813765525817871,
                 5: 10.7832670211792, 6: 10.78459644317627, 7: 10.81929874420166, 8: 10.795958518981934,
                 9: 10.809197425842285, 10: 10.794624328613281}
PINNED_EVAL_LOSSES = {5: 10.802870614188057, 10: 10.80145972115653}


@pytest.mark.slow
def test_losses_are_pinned_bit_for_bit(tiny, tmp_path):
    r = run(tiny, tmp_path / "pinned", "none", "steps=10", "optim.total_steps=10", *_evals(tiny))
    assert {k: v for k, v in r["losses"].items() if k != 1} == {k: v for k, v in PINNED_LOSSES.items() if k != 1}
    assert abs(np.float32(r["losses"][1]) - np.float32(PINNED_LOSSES[1])) <= np.spacing(np.float32(PINNED_LOSSES[1]))
    assert r["eval_losses"] == PINNED_EVAL_LOSSES
    # the trained weights come back for inference without an optimizer: equal to the checkpoint's, and the
    # held-out evaluator on them gives the step-10 eval the trainer logged
    import jax
    from flax import nnx

    from alm_jax.evaluation import HeldOutLoss
    from alm_jax.models.alm import split_trainable
    from alm_jax.training.checkpoint import restore_params
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(_paths(tiny), tmp_path / "pinned", "steps=10", "optim.total_steps=10", *_evals(tiny))
    model, step = restore_params(build_alm(cfg.model, seed=cfg.seed), cfg.checkpoint.dir)
    saved = _state(Path(cfg.checkpoint.dir), 10)["trainable"]
    def leaves(tree):   # path (as strings, without nnx's "value" level) -> array
        return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path if getattr(k, "key", None) != "value"):
                np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    ours, theirs = leaves(nnx.to_pure_dict(split_trainable(model)[1])), leaves(saved)
    assert step == 10 and ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert HeldOutLoss(cfg, cfg.eval.corpus, batches=2).run(model) == {"eval/loss": PINNED_EVAL_LOSSES[10]}
    # the same through the command: `alm eval` reads the run config from the checkpoint
    out = subprocess.run([sys.executable, "-m", "alm_jax.cli", "eval", cfg.checkpoint.dir, "--suite", "loss",
                          "--batches", "2", "--batch-size", "8", "--out", str(tmp_path / "eval")],
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "loss.json").read_text())
    assert report == {cfg.checkpoint.dir: {"step": 10, "eval/loss": PINNED_EVAL_LOSSES[10]}}


def _stochastic(tiny) -> list[str]:
    """Everything a training forward draws or updates besides the weights: ALARM-CA over two encoders with
    BatchNorm adapters (running statistics), fusion dropout 0.1 and LoRA (rank 2, on the scanned LLM stack)
    with dropout 0.1."""
    enc = f"{{path: {_paths(tiny)['whisper']}, taps: [1], tap_indexing: hf, pad_to_seconds: null}}"
    return ["model.connector.kind=alarm_ca", "model.connector.adapter_dim=16", "model.connector.norm=batch",
            "model.connector.fusion_heads=4", "model.connector.dropout=0.1", f"model.encoders=[{enc}, {enc}]",
            "model.lora.rank=2", "model.lora.dropout=0.1", "data.max_text_tokens=64"]


@pytest.mark.slow
def test_exact_resume_after_kill_9(tiny, tmp_path):
    """With dropout (connector and LoRA) and BatchNorm on: the resumed run is bit-identical to the uninterrupted
    one, losses, evals and the final state (parameters, optimizer, running statistics, dropout counters)."""
    knobs = (*_evals(tiny), *_stochastic(tiny))
    full = run(tiny, tmp_path / "full", "none", *knobs)
    assert full["step"] == 20 and len(full["losses"]) == 20
    killed = run(tiny, tmp_path / "resumed", "kill:13", *knobs, expect_rc=-signal.SIGKILL)
    assert killed["step"] == 13
    resumed = run(tiny, tmp_path / "resumed", "none", *knobs)
    assert sorted(resumed["losses"]) == list(range(11, 21))        # restarted from the checkpoint at 10
    for s in range(11, 21):
        assert resumed["losses"][s] == full["losses"][s], s          # bit-identical: same samples, same math
    final = _state(tmp_path / "full" / "ckpt", 20)
    assert _same_tree(final, _state(tmp_path / "resumed" / "ckpt", 20))
    lora = final["model_state"]["llm"]["layers"]["self_attn"]["q_proj"]["dropout"]["rngs"]["count"]["value"]
    np.testing.assert_array_equal(lora, [20, 20])                    # one mask per step and layer (scanned)
    assert final["model_state"]["connector"]["fusion"]["decoders"]["0"]["0"]["dropout"]["rngs"]["count"]["value"] > 0
    assert not np.allclose(final["model_state"]["connector"]["adapters"]["0"]["norm1"]["mean"]["value"], 0)
    # held-out evals: every 5 steps on the same 2 batches (the eval pipeline restarts each time), so the
    # resumed process, whose first eval is at 15, matches the run that already evaluated at 5 and 10
    assert sorted(full["eval_losses"]) == [5, 10, 15, 20]
    assert killed["eval_losses"] == {s: full["eval_losses"][s] for s in (5, 10)}
    assert resumed["eval_losses"] == {s: full["eval_losses"][s] for s in (15, 20)}
    assert full["eval_losses"][20] < full["eval_losses"][5]          # evaluated with the current parameters
    from alm_jax.training.metrics import read_metrics
    logged = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    assert {s: logged[s]["eval/loss"] for s in (5, 10, 15, 20)} == full["eval_losses"]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_continues(tiny, tmp_path):
    first = run(tiny, tmp_path / "run", "term:7")
    assert first["stopped_by"] == "preempted" and first["step"] == 7
    assert (tmp_path / "run" / "ckpt" / "7").is_dir()
    second = run(tiny, tmp_path / "run")
    assert min(second["losses"]) == 8 and second["step"] == 20


@pytest.mark.slow
@pytest.mark.multidevice
def test_same_losses_on_every_mesh_shape(tiny, tmp_path):
    results = {}
    for mesh in [(8, 1, 1), (2, 2, 2), (1, 8, 1)]:   # data only, all three axes, fsdp only
        d, f, t = mesh
        r = run(tiny, tmp_path / f"mesh{d}{f}{t}", "none", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                "steps=5", devices=8)
        results[mesh] = [r["losses"][s] for s in range(1, 6)]
    base = results[(8, 1, 1)]
    for mesh, losses in results.items():
        assert losses == pytest.approx(base, abs=1e-5), mesh


def test_mesh_product_must_match_device_count():
    from alm_jax.errors import ConfigError
    from alm_jax.sharding import make_mesh
    with pytest.raises(ConfigError, match="devices"):
        make_mesh(2, 2, 2)
    with pytest.raises(ConfigError, match="at most one"):
        make_mesh(-1, -1, 1)


@pytest.mark.slow
def test_nonfinite_batch_is_skipped_counted_and_training_continues(tiny, tmp_path):
    run_dir = tmp_path / "run"
    r = run(tiny, run_dir, "none", "--poison=3", "steps=6", "checkpoint.every=1", "checkpoint.keep_last=0",
            "logging.every=1")
    assert r["step"] == 6 and r["stopped_by"] == "done"
    assert math.isnan(r["losses"][3])                                # the NaN audio reached the loss
    assert all(math.isfinite(r["losses"][s]) for s in (1, 2, 4, 5, 6))
    from alm_jax.training.metrics import read_metrics
    rows = {row["step"]: row for row in read_metrics(run_dir)}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None   # not averaged into the window
    assert rows[4]["loss"] == pytest.approx(r["losses"][4])
    # the skipped step left parameters and optimizer state exactly as they were; the next step moves them
    ckpt = run_dir / "ckpt"
    assert _same_tree(_state(ckpt, 2), _state(ckpt, 3))
    assert not _same_tree(_state(ckpt, 3)["trainable"], _state(ckpt, 4)["trainable"])
    # MFU needs a peak: none on CPU; the model FLOP rate is still logged
    assert rows[6]["mfu"] is None and rows[6]["tflops_per_s"] > 0
    assert r["flops_per_step"] == _expected_tiny_flops()["train"]


@pytest.mark.slow
def test_max_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    r = run(tiny, run_dir, "none", "--poison=3-8", "max_bad_steps=3", "steps=10", "checkpoint.every=2",
            "checkpoint.keep_last=0", expect_rc=3)
    assert r["stopped_by"] == "nonfinite" and r["step"] == 4          # step 5 was the 3rd bad one: no step 6
    assert "3 consecutive steps had a non-finite loss" in r["error"] and "max_bad_steps=3" in r["error"]
    assert "stopped at step 5" in r["error"] and "last good checkpoint is step 4" in r["error"]
    ckpt = run_dir / "ckpt"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]
    # the checkpoint saved inside the streak holds the parameters of the last good step (2)
    assert _same_tree(_state(ckpt, 2), _state(ckpt, 4))


def test_eval_needs_a_corpus_and_evaluators(tiny, tmp_path):
    from alm_jax.errors import ConfigError
    from alm_jax.evaluation import build_evaluators
    from alm_jax.training.trainer import train
    with pytest.raises(ConfigError, match=r"eval\.corpus is empty but eval\.every=5"):
        build_evaluators(tiny_config(_paths(tiny), tmp_path, "eval.every=5"))
    with pytest.raises(ConfigError, match=r"eval\.batches=0"):
        build_evaluators(tiny_config(_paths(tiny), tmp_path, "eval.every=5", "eval.batches=0",
                                     f"eval.corpus=[{_paths(tiny)['eval_corpus']}]"))
    with pytest.raises(ConfigError, match=r"eval\.evaluators: unknown \['bleu'\]"):
        build_evaluators(tiny_config(_paths(tiny), tmp_path, "eval.every=5", "eval.evaluators=[bleu]",
                                     f"eval.corpus=[{_paths(tiny)['eval_corpus']}]"))
    with pytest.raises(ConfigError, match="no evaluators were given"):   # evals asked for, none handed over
        train(tiny_config(_paths(tiny), tmp_path, "eval.every=5", f"eval.corpus=[{_paths(tiny)['eval_corpus']}]"))


def _batches(cfg, paths, rows, shards, n=3):
    from alm_jax.data.multihost import build_batches
    it = build_batches(cfg, paths["llm"], cfg.data.corpus, rows=rows, data_shards=shards).iterator()
    return [next(it) for _ in range(n)]


def _glue(*per_process):
    """The global batches that make_array_from_process_local_data assembles: process p's rows after p-1's."""
    return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*per_process)]


def _same_batches(a, b) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _samples(batch) -> list[bytes]:
    return [batch["input_ids"][r].tobytes() + batch["audio"][r].tobytes() for r in range(len(batch["input_ids"]))]


def test_global_batches_are_the_same_for_any_process_count(tiny, tmp_path):
    from alm_jax.errors import ConfigError
    from alm_jax.data.multihost import BatchLayout
    paths = _paths(tiny)
    cfg = tiny_config(paths, tmp_path)                  # batch 8, DeSTA with 4 audio tokens per clip, 1 clip
    # 2 data shards: 1 process reading both == 2 processes reading one each, row for row (audio slots too)
    two_shards = _batches(cfg, paths, (0, 8), 2)
    assert _same_batches(two_shards, _glue(_batches(cfg, paths, (0, 4), 2), _batches(cfg, paths, (4, 8), 2)))
    # 8 data shards (one per row): the same global batches for 1, 2 or 4 processes
    eight = _batches(cfg, paths, (0, 8), 8)
    assert _same_batches(eight, _glue(*[_batches(cfg, paths, (r, r + 4), 8) for r in (0, 4)]))
    assert _same_batches(eight, _glue(*[_batches(cfg, paths, (r, r + 2), 8) for r in (0, 2, 4, 6)]))
    # a different shard count keeps each batch's samples but not their row order: the reason to fix it
    one_shard = _batches(cfg, paths, (0, 8), 1)
    for a, b in zip(one_shard, two_shards):
        assert sorted(_samples(a)) == sorted(_samples(b))
    assert any(_samples(a) != _samples(b) for a, b in zip(one_shard, two_shards))
    # audio indices are row-local: every row places its own clip 0's 4 tokens, in order, wherever it sits
    for batch in two_shards + eight:
        for r in range(8):
            clip, pos = batch["audio_clip"][r], batch["audio_pos"][r]
            assert clip[clip >= 0].tolist() == [0] * 4 and pos[clip >= 0].tolist() == [0, 1, 2, 3], r
            assert (pos[clip < 0] == -1).all()
    with pytest.raises(ConfigError, match="positive divisor"):
        BatchLayout.make(8, (0, 4), 3)
    with pytest.raises(ConfigError, match="does not line up"):
        BatchLayout.make(8, (0, 4), 1)


def _expected_tiny_flops() -> dict:
    """The tiny setup's training FLOPs per step, counted by hand (batch 8, 48 text tokens, 0.6 s clips ->
    60 mel frames -> 30 encoder positions; Q-Former: 2 taps x 4 queries, hidden 32, 1 layer, ffn 64)."""
    from alm_jax.training import flops as F
    B, T, frames = 8, 48, 30
    enc = F.encoder_forward_flops(2, 32, 64, 4, 80, frames)              # both blocks are tapped
    taps, q, h, inter, e, llm_d = 2, 4, 32, 64, 32, 32
    layer = (2 * q * 4 * h * h + 2 * 2 * q * q * h                       # self-attention: projections, scores+values
             + 2 * q * 2 * h * h + 2 * frames * 2 * e * h + 2 * 2 * q * frames * h   # cross-attention
             + 2 * q * 2 * h * inter)                                     # MLP
    conn = taps * layer + 2 * q * h * taps + 2 * q * h * llm_d           # + per-query tap mix + projection
    llm = F.transformer_forward_flops(2, 32, 64, 4, 2, 8, T, 49152)
    return {"encoder": B * enc, "connector": B * conn, "llm": B * llm, "lora": 0,
            "train": B * (enc + 3 * conn + 2 * llm)}


def test_flops_per_step_count_every_part(tiny, tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alm_jax.training import flops as F
    from alm_jax.training.flops import matmul_flops, step_flops
    from alm_jax.weights.alm_params import build_alm
    cfg = tiny_config(_paths(tiny), tmp_path)
    model = build_alm(cfg.model)
    T, S = 48, 9600
    sds = jax.ShapeDtypeStruct
    sample = {k: sds((1, T), jnp.int32) for k in ("input_ids", "targets", "attention_mask", "audio_clip", "audio_pos")}
    sample.update(loss_mask=sds((1, T), jnp.float32), audio=sds((1, S), jnp.float32),
                  audio_samples=sds((1,), jnp.int32))
    assert step_flops(model, sample, 8) == _expected_tiny_flops()
    # the analytic encoder and LLM formulas equal the matmuls of the traced modules (the LLM trace computes
    # the full attention square; the count halves it for causal attention)
    enc = matmul_flops(jax.make_jaxpr(lambda x: model.encoders[0](x))(sds((1, 80, 60), jnp.float32)))
    assert enc == F.encoder_forward_flops(2, 32, 64, 4, 80, 30)
    llm = matmul_flops(jax.make_jaxpr(lambda e: model.llm(inputs_embeds=e))(sds((1, T, 32), jnp.float32)))
    assert llm == F.transformer_forward_flops(2, 32, 64, 4, 2, 8, T, 49152, causal=False)
    # LoRA adapters count 3x on top of the frozen LLM's 2x
    from alm_jax.models.lora import apply_lora
    apply_lora(model.llm, rank=2, alpha=4.0, target_regex=r".*(q_proj|v_proj).*", rngs=nnx.Rngs(0))
    with_lora = step_flops(model, sample, 8)
    lora = 8 * 2 * F.lora_forward_flops(T, F.llm_layer_shapes(32, 4, 2, 8), 2)   # 2 layers x (q, v)
    assert with_lora["lora"] == lora
    assert with_lora["train"] == _expected_tiny_flops()["train"] + 3 * lora


@pytest.mark.parametrize("extra", [
    ("model.connector.kind=alarm", "model.connector.adapter_dim=16", "model.connector.norm=batch",
     "model.encoders.0.tap_indexing=hf", "data.max_text_tokens=64"),
    ("model.connector.dropout=0.1",)], ids=["alarm-batchnorm", "desta-dropout"])
def test_running_state_trains_resumes_exactly_and_serves_eval(extra, tiny, tmp_path):
    """What a training forward updates besides the weights (`RUNNING_STATE`: ALARM's BatchNorm statistics, the
    Q-Former's dropout RNG counters) moves every step, rides in the checkpoint (a resumed run ends bit-identical
    to an uninterrupted one, dropout masks included), and a restored run evaluates with it in eval mode without
    changing it."""
    from flax import nnx

    from alm_jax.evaluation.loss import HeldOutLoss
    from alm_jax.export.source import load_run
    from alm_jax.models.alm import RUNNING_STATE
    from alm_jax.training.trainer import train
    from alm_jax.weights.alm_params import build_alm
    extra = (*extra, "steps=4", "checkpoint.every=2", "optim.warmup_steps=1", "optim.total_steps=4")
    whole = train(tiny_config(_paths(tiny), tmp_path / "whole", *extra))
    cfg = tiny_config(_paths(tiny), tmp_path / "split", *extra)
    train(cfg, stop_after=2)
    resumed = train(cfg)
    assert resumed.losses == {k: v for k, v in whole.losses.items() if k > 2}

    def running(model):
        return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, RUNNING_STATE))}
    run = load_run(tmp_path / "whole" / "ckpt")
    a, b = running(run.model), running(load_run(tmp_path / "split" / "ckpt").model)
    fresh = running(build_alm(cfg.model, seed=cfg.seed))
    assert a and a.keys() == b.keys() == fresh.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], fresh[k]), k    # four training forwards moved every entry
    ev = HeldOutLoss(run.cfg, [str(tiny / "eval_corpus")], batches=1)
    assert ev.run(run.model) == ev.run(run.model)        # eval mode: no dropout, running statistics
    after = running(run.model)
    for k in a:
        np.testing.assert_array_equal(after[k], a[k])   # read, never updated


@pytest.mark.slow
def test_fresh_run_refuses_a_used_checkpoint_dir(tiny, tmp_path):
    first = run(tiny, tmp_path / "run", "none", "steps=10")
    assert first["step"] == 10
    out = tmp_path / "again.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(HERE / "run_tiny_train.py"), str(tiny / "paths.json"),
                        str(tmp_path / "run"), str(out), "none", "resume=none"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "resume=auto" in r.stderr
