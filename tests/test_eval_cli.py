"""`alm eval CKPT... --suite S --out DIR` (results JSON + markdown table, checkpoints side by side) and suites
run by the trainer every `eval.every` steps next to the held-out loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tiny_setup import tiny_config

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def paths(tiny):
    return json.loads((tiny / "paths.json").read_text())


def _checkpoint(cfg, step, seed):
    """A checkpoint as `alm train` writes it (run config + trainable state), connector drawn with `seed`."""
    from alm_jax.config import to_dict
    from alm_jax.training.checkpoint import save_trained
    from alm_jax.weights.alm_params import build_alm
    save_trained(build_alm(cfg.model, seed=seed), cfg.checkpoint.dir, step, to_dict(cfg))


def test_markdown_table():
    from alm_jax.evaluation.report import markdown_table
    table = markdown_table({"runs/a": {"step": 3, "eval/x": 1.0, "eval/y": 2.5},
                            "runs/b": {"step": 9, "eval/x": 0.5}}, title="mmau")
    assert table.splitlines() == ["## mmau", "", "| metric | runs/a (step 3) | runs/b (step 9) |", "|---|---:|---:|",
                                  "| eval/x | 1.0000 | 0.5000 |", "| eval/y | 2.5000 | – |"]


def test_alm_eval_mmau_on_two_checkpoints(paths, tmp_path):
    runs = []
    for name, step, seed in (("a", 4, 0), ("b", 6, 1)):
        cfg = tiny_config(paths, tmp_path / name)
        _checkpoint(cfg, step, seed)
        runs.append(cfg.checkpoint.dir)
    items = [{"id": f"i{i}", "audio_id": f"./test-mini-audios/i{i}.wav", "question": "What is it?",
              "choices": ["Tone", "Noise", "Speech", "Music"], "answer": "Tone", "task": "sound",
              "difficulty": "easy", "sub-category": "Counting", "category": "Perception"} for i in range(3)]
    for it in items:
        p = tmp_path / "bench" / it["audio_id"][2:]
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, (0.2 * np.sin(np.arange(8000) / 10)).astype(np.float32), 16000)
    (tmp_path / "bench" / "mmau-test-mini.json").write_text(json.dumps(items))
    out = subprocess.run([sys.executable, "-m", "alm_jax.cli", "eval", *runs, "--suite", "mmau", "--data",
                          str(tmp_path / "bench" / "mmau-test-mini.json"), "--limit", "2", "--batch-size", "2",
                          "--max-new-tokens", "4", "--out", str(tmp_path / "out")],
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "mmau.json").read_text())
    assert list(rows) == runs and [rows[r]["step"] for r in runs] == [4, 6]
    assert all(rows[r]["eval/mmau/scored"] == 2 and 0 <= rows[r]["eval/mmau/accuracy"] <= 100 for r in runs)
    table = (tmp_path / "out" / "mmau.md").read_text()
    assert f"| metric | {runs[0]} (step 4) | {runs[1]} (step 6) |" in table and "| eval/mmau/accuracy |" in table
    details = sorted((tmp_path / "out" / "mmau-details").iterdir())
    assert len(details) == 2
    d = json.loads(details[0].read_text())
    assert d["checkpoint"] == runs[0] and len(d["items"]) == 2 and "model_output" in d["items"][0]
    # the details file re-scores with `alm eval score` to the suite's own numbers
    from alm_jax.cli import main
    assert main(["eval", "score", "--benchmark", "mmau", "--predictions", str(details[0]),
                 "--out", str(tmp_path / "rescored.json")]) == 0
    rescored = json.loads((tmp_path / "rescored.json").read_text())
    assert rescored["scored"] == 2 and rescored["accuracy"] == rows[runs[0]]["eval/mmau/accuracy"]


def test_suites_run_inside_training(paths, tmp_path):
    from alm_jax.evaluation import build_evaluators
    from alm_jax.training.trainer import train
    cfg = tiny_config(paths, tmp_path, "steps=2", "optim.total_steps=2", "eval.every=2", "eval.batches=1",
                      f"eval.corpus=[{paths['eval_corpus']}]", "eval.evaluators=[loss, hallucination]",
                      "eval.suites=[{name: hallucination, clips: 2, max_new_tokens: 3}]")
    evaluators = build_evaluators(cfg)
    assert [e.name for e in evaluators] == ["loss", "hallucination"]
    result = train(cfg, evaluators=evaluators)
    assert set(result.eval_losses) == {2}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for r in rows if r.get("step") == 2 for k, v in r.items()}
    assert logged["eval/loss"] == result.eval_losses[2]
    assert 0 <= logged["eval/hallucination/accuracy"] <= 100 and logged["eval/hallucination/questions"] > 0
