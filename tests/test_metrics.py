"""Metrics (JSONL, TensorBoard, progress line, timers, aggregates) and FLOP accounting (exact counts)."""

import io
import json
import struct

import jax.numpy as jnp
import pytest
from tensorboardX.proto import event_pb2

from alm_jax.training import flops, metrics
from alm_jax.training.metrics import MetricsAggregator, MetricsLogger, StepTimer, read_metrics


def _read_tb_scalars(logdir):
    """{tag: [(step, value)]} from TFRecord event files (length, crc, payload, crc framing)."""
    out = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files
    for f in files:
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_jsonl_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    out = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=100, progress="auto", stream=out) as log:
        log.log(10, {"loss": jnp.float32(2.5), "lr": 1e-4, "grad_norm": float("nan"),
                     "skipped_steps": 1, "bad_samples_by_kind": {"decode": 2, "too_long": 1}, "mfu": None})
        log.log(20, {"loss": 2.25, "lr": 2e-4, "skipped_steps": 1, "bad_samples_by_kind": {"decode": 3}})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == 1e-4 and rows[0]["grad_norm"] is None
    assert rows[0]["bad_samples_by_kind"] == {"decode": 2, "too_long": 1} and rows[0]["mfu"] is None
    assert isinstance(rows[0]["skipped_steps"], int)
    # strict JSON: no NaN tokens in the file
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    tb = _read_tb_scalars(tmp_path / "tb")
    assert tb["loss"] == [(10, 2.5), (20, 2.25)]
    assert tb["bad_samples_by_kind/decode"] == [(10, 2.0), (20, 3.0)]
    assert tb["lr"][1] == (20, pytest.approx(2e-4))
    assert "grad_norm" not in tb and "mfu" not in tb         # no value: no point
    assert out.getvalue() == ""                              # CI: quiet


def test_progress_line_modes(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    tty = FakeTTY()
    with MetricsLogger(tmp_path / "a", total_steps=100, tensorboard=False, stream=tty) as log:
        assert log.show_progress
        log.log(10, {"loss": 1.23456, "tokens_per_s": 12345.0})
        clock[0] += 20.0                                     # 10 steps in 20 s -> 80 steps left = 160 s
        log.log(20, {"loss": 1.0, "tokens_per_s": 2_500_000.0})
    text = tty.getvalue()
    assert "step 10/100 | loss 1.2346 | 12.3k tok/s" in text
    assert "step 20/100 | loss 1.0000 | 2.50M tok/s | 0.5 step/s | ETA 2m40s" in text
    assert text.startswith("\r") and text.endswith("\n")

    monkeypatch.setenv("CI", "true")
    quiet = FakeTTY()
    with MetricsLogger(tmp_path / "b", total_steps=10, tensorboard=False, stream=quiet) as log:
        log.log(1, {"loss": 1.0})
    assert quiet.getvalue() == ""
    forced = io.StringIO()                                   # not a TTY, but progress="on"
    with MetricsLogger(tmp_path / "c", total_steps=10, tensorboard=False, progress="on", stream=forced) as log:
        log.log(5, {"loss": 0.5, "step_time": 2.0})
    assert forced.getvalue() == "step 5/10 | loss 0.5000 | ETA 10s\n"
    off = FakeTTY()
    monkeypatch.delenv("CI")
    with MetricsLogger(tmp_path / "d", total_steps=10, tensorboard=False, progress="off", stream=off) as log:
        log.log(5, {"loss": 0.5})
    assert off.getvalue() == ""


def test_only_process_zero_writes(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path / "p1", total_steps=10, progress="on", process_index=1, stream=out) as log:
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "p1").exists() and out.getvalue() == ""


def test_step_timer_separates_data_wait(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])

    def slow_iter():
        while True:
            clock[0] += 0.3            # the loader takes 0.3 s
            yield 1

    timer, it = StepTimer(), slow_iter()
    assert timer.fetch(it) == 1
    with timer.step():
        clock[0] += 0.1                # the step takes 0.1 s
    assert timer.last_data_wait == pytest.approx(0.3) and timer.last_step == pytest.approx(0.1)
    with timer.data():
        clock[0] += 0.05
    assert timer.last_data_wait == pytest.approx(0.05)
    with pytest.raises(StopIteration):
        timer.fetch(iter([]))


def test_aggregator_summary():
    agg = MetricsAggregator(flops_per_step=1e12, num_devices=2, peak_flops_per_device=1e12)
    agg.add(loss=jnp.float32(2.0), grad_norm=jnp.float32(1.0), tokens=100, samples=4, step_time=0.5,
            data_wait=0.5, bad_samples={"decode": 1})
    agg.add(loss=jnp.float32(float("nan")), grad_norm=jnp.float32(float("inf")), tokens=100, samples=4,
            step_time=0.5, data_wait=0.5, skipped=True)
    agg.add(loss=4.0, grad_norm=3.0, tokens=200, samples=8, step_time=1.5, data_wait=0.5,
            bad_samples={"decode": 2, "silent": 1})
    s = agg.summary(lr=3e-4)
    assert s["loss"] == 3.0 and s["grad_norm"] == 2.0               # skipped step not averaged
    assert s["tokens_per_s"] == 100.0 and s["samples_per_s"] == 4.0  # 400 tokens / 4 s wall
    assert s["step_time"] == pytest.approx(2.5 / 3) and s["data_wait"] == pytest.approx(0.5)
    assert s["mfu"] == pytest.approx(3e12 / 4.0 / 2e12)
    assert s["skipped_steps"] == 1 and s["steps"] == 3 and s["lr"] == 3e-4
    assert s["bad_samples_by_kind"] == {"decode": 3, "silent": 1}
    agg.add(loss=1.0, tokens=10, samples=1, step_time=1.0)
    s2 = agg.summary()
    assert s2["loss"] == 1.0 and s2["steps"] == 1 and s2["skipped_steps"] == 1   # totals carry over
    assert MetricsAggregator(flops_per_step=1e12).summary()["mfu"] is None        # CPU: no peak


# ------------------------------------------------------------------------------------------- FLOPs


def test_transformer_forward_flops_one_layer_by_hand():
    # d=4, d_ff=8, 2 query heads, 1 kv head, head_dim 2, 3 tokens, vocab 5
    # attention weights: q 4*4=16, k 4*2=8, v 8, o 4*4=16 -> 48;  gated MLP 3*4*8=96;  head 4*5=20
    # matmul: 2 * 3 tokens * (48 + 96 + 20) = 984
    # attention: 2 (QK^T, AV) * 2 (mul+add) * 3*3 * (2 heads*2) = 144, causal half = 72
    assert flops.transformer_forward_flops(1, 4, 8, 2, 1, 2, 3, 5) == 984 + 72
    # plain MLP 2*4*8=64, full attention: 2*3*(48+64+20) + 144
    assert flops.transformer_forward_flops(1, 4, 8, 2, 1, 2, 3, 5, gated_mlp=False, causal=False) == 792 + 144
    # layers and no LM head: 2 layers -> 2*3*2*(48+96) + 2*72
    assert flops.transformer_forward_flops(2, 4, 8, 2, 1, 2, 3, 0) == 1728 + 144


def test_encoder_forward_flops_by_hand():
    # d=4, d_ff=8, 2 heads (head_dim 2), 3 mel bins, 5 output frames (10 mel frames), kernel 3
    conv1 = 2 * 10 * 3 * 3 * 4          # 720
    conv2 = 2 * 5 * 3 * 4 * 4           # 480
    block = 2 * 5 * (4 * 16 + 2 * 32)   # q,k,v,o 16 each + fc1/fc2 32 each: 1280
    attn = 2 * 2 * 5 * 5 * 4            # non-causal: 400
    assert flops.encoder_forward_flops(1, 4, 8, 2, n_mels=3, frames=5) == conv1 + conv2 + block + attn == 2880
    # Whisper-large-v3 encoder, 30 s: 2 * 1500 * 629M block params + attention 0.37T + convs ~ 2.27 TFLOP
    big = flops.encoder_forward_flops(32, 1280, 5120, 20, n_mels=128)
    assert 2.0e12 < big < 2.3e12


def test_training_multipliers():
    # frozen encoder 1x, connector 3x, frozen LLM 2x (forward + activation grads), LoRA 3x
    assert flops.alm_train_flops(100, 10, 1000, lora_fwd=7) == 100 + 30 + 2000 + 21
    assert flops.alm_train_flops(100, 10, 1000, llm="trained") == 100 + 30 + 3000
    assert flops.alm_train_flops(100, 10, 1000, llm="forward_only") == 100 + 30 + 1000
    # a fully trained LLM alone is the familiar 6 * params * tokens (+ attention)
    fwd = flops.transformer_forward_flops(1, 4, 8, 2, 1, 2, 3, 5, causal=False) - 144
    assert flops.alm_train_flops(0, 0, fwd, llm="trained") == 6 * (48 + 96 + 20) * 3
    # LoRA rank 2 on q and v of one layer of the model above (q: 4->4, v: 4->2), 3 tokens
    shapes = flops.llm_layer_shapes(4, 2, 1, 2, ("q_proj", "v_proj"))
    assert shapes == [(4, 4), (4, 2)]
    assert flops.lora_forward_flops(3, shapes, rank=2) == 2 * 3 * 2 * (8 + 6)
    with pytest.raises(ValueError, match="choose one of"):
        flops.alm_train_flops(1, 1, 1, llm="half")


def test_mfu_and_peaks():
    assert flops.mfu(989e12 * 8 * 0.5, 1.0, 8, 989e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, 1, None) is None
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("cpu") is None
