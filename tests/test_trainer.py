"""The training loop: exact resume after kill -9, SIGTERM checkpoint, equal losses across mesh shapes,
checkpoint restore onto another mesh, and clear config errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_setup import write_tiny_setup

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_models):
    root = tmp_path_factory.mktemp("tiny")
    paths = write_tiny_setup(root, demo_models.llm)
    (root / "paths.json").write_text(json.dumps(paths))
    return root


def run(tiny, run_dir, action="none", *overrides, devices=1, expect_rc=0):
    out = run_dir.parent / f"{run_dir.name}-{action.replace(':', '')}.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "JAX_PLATFORMS": "cpu"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    r = subprocess.run([sys.executable, str(HERE / "run_tiny_train.py"), str(tiny / "paths.json"), str(run_dir),
                        str(out), action, *overrides], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == expect_rc, r.stderr[-4000:]
    result = json.loads(out.read_text())
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result


@pytest.mark.slow
def test_exact_resume_after_kill_9(tiny, tmp_path):
    full = run(tiny, tmp_path / "full")
    assert full["step"] == 20 and len(full["losses"]) == 20
    killed = run(tiny, tmp_path / "resumed", "kill:13", expect_rc=-signal.SIGKILL)
    assert killed["step"] == 13
    resumed = run(tiny, tmp_path / "resumed")
    assert sorted(resumed["losses"]) == list(range(11, 21))        # restarted from the checkpoint at 10
    for s in range(11, 21):
        assert resumed["losses"][s] == full["losses"][s], s          # bit-identical: same samples, same math


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
    for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)]:
        d, f, t = mesh
        r = run(tiny, tmp_path / f"mesh{d}{f}{t}", "none", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                "steps=5", devices=8)
        results[mesh] = [r["losses"][s] for s in range(1, 6)]
    base = results[(8, 1, 1)]
    for mesh, losses in results.items():
        assert losses == pytest.approx(base, abs=1e-5), mesh


def test_mesh_product_must_match_device_count():
    from alm_jax.errors import ConfigError
    from alm_jax.training.mesh import make_mesh
    with pytest.raises(ConfigError, match="devices"):
        make_mesh(2, 2, 2)
    with pytest.raises(ConfigError, match="at most one"):
        make_mesh(-1, -1, 1)
