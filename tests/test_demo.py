"""The main job end to end, at toy size: self-generated corpus -> training -> held-out loss -> answers."""

import json
import types

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, demo_models):
    from alm_jax.demo import run_demo
    args = types.SimpleNamespace(home=None, out=str(tmp_path / "demo"), train_records=8, eval_records=2,
                                 steps=2, max_new_tokens=24)
    assert run_demo(args) == 0
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_records"] >= 1 and summary["eval_records"] >= 1
    assert summary["eval_loss_before"] > 0 and summary["eval_loss_after"] > 0
    assert summary["answers"] and all(isinstance(a["alm"], str) for a in summary["answers"])
    # a second run reuses the corpus and trains afresh instead of tripping over its old checkpoints
    assert run_demo(args) == 0
