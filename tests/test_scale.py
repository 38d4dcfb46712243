"""`alm scale`: a data-size study on the tiny setup (points, table, fit, figure, resume, --launch), and the
power-law fit on synthetic data with known parameters."""

import csv
import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from alm_jax.config import to_dict
from alm_jax.scaling.fit import fit_power_law, predict
from tiny_setup import tiny_config

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The points compile the same steps: a persistent compilation cache lets them (and the launched
    processes, through the environment) share them."""
    import jax
    try:
        from jax._src import compilation_cache as cc
    except ImportError:   # pragma: no cover - only slower
        yield
        return
    path = str(tmp_path_factory.mktemp("jax-cache"))
    keys = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": 0}
    env = {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    old = {k: jax.config.values[k] for k in keys}
    old_env = {k: os.environ.get(k) for k in env}
    for k, v in keys.items():
        jax.config.update(k, v)
    os.environ.update(env)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    cc.reset_cache()


# ----------------------------------------------------------------------------------------------- the fit


def test_fit_recovers_known_parameters():
    n = np.array([30, 100, 300, 1000, 3000, 10000, 30000], dtype=float)
    a, b, c = 1.8, 25.0, 0.45
    noise = np.random.default_rng(0).normal(0.0, 0.003, n.size)
    fit = fit_power_law(n, predict(n, a, b, c) + noise)
    assert fit["status"] == "ok" and fit["free"] == ["a", "b", "c"] and fit["fixed"] == {} and fit["dof"] == 4
    p, se = fit["params"], fit["stderr"]
    assert p["a"] == pytest.approx(a, abs=0.02) and p["c"] == pytest.approx(c, abs=0.01)
    assert p["b"] == pytest.approx(b, rel=0.05)
    assert all(math.isfinite(se[k]) and 0 < se[k] for k in "abc")
    # the truth lies within a few standard errors
    assert all(abs(p[k] - v) < 5 * se[k] for k, v in (("a", a), ("b", b), ("c", c)))
    # an increasing metric (accuracy-like: b < 0) fits too
    acc = fit_power_law(n, predict(n, 0.9, -2.0, 0.3))
    assert acc["status"] == "ok" and acc["params"]["b"] == pytest.approx(-2.0, rel=1e-3)


def test_fit_with_few_points_says_what_it_held_fixed():
    n = np.array([100.0, 1000.0, 10000.0])
    three = fit_power_law(n, predict(n, 0.0, 8.0, 0.3))
    assert three["status"] == "ok" and three["fixed"] == {"a": 0.0} and three["free"] == ["b", "c"]
    assert "held a=0 fixed" in three["note"] and three["stderr"]["a"] is None
    assert three["params"]["c"] == pytest.approx(0.3, abs=1e-6)
    two = fit_power_law(n[:2], [3.0, 2.0])
    assert two["status"] == "ok" and two["dof"] == 0 and "no standard errors" in two["note"]
    assert two["stderr"] == {"a": None, "b": None, "c": None}
    one = fit_power_law(n[:1], [3.0])
    assert one["status"] == "not_fitted" and "not fitted" in one["note"] and one["params"] is None
    held = fit_power_law(n, predict(n, 1.0, 8.0, 0.5), fixed={"c": 0.5})
    assert held["free"] == ["a", "b"] and "as asked" in held["note"]
    assert held["params"]["a"] == pytest.approx(1.0, abs=1e-6) and held["params"]["b"] == pytest.approx(8.0, rel=1e-6)


# ------------------------------------------------------------------------------------------ the command


def _paths(tiny) -> dict:
    return json.loads((tiny / "paths.json").read_text())


def _alm(*argv) -> int:
    from alm_jax.cli import main
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):
    """A config file for the CLI and a 3-point study run once: (config path, study dir, output)."""
    root = tmp_path_factory.mktemp("scale")
    cfg = tiny_config(_paths(tiny), root / "unused", f"eval.corpus=[{_paths(tiny)['eval_corpus']}]",
                      "eval.batches=1", "checkpoint.every=0")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    out = root / "study"
    return config, out


def _mtimes(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted((out / "points").glob("*/checkpoints/*"))}


def test_scale_study_writes_table_fit_and_figure_and_resumes(study, capsys):
    config, out = study
    rc = _alm("scale", "--config", config, "--fractions", "0.25,0.5,1.0", "--out", out,
              "--budget", "steps-per-sample=0.3", "logging.every=1")
    assert rc == 0
    said = capsys.readouterr().out
    # 48 records, batch 8: 12 / 24 / 48 records, ceil(0.3 * records / 8) = 1 / 1 / 2 steps
    names = {"f0.25": (12, 1), "f0.5": (24, 1), "f1.0": (48, 2)}
    for name, (records, steps) in names.items():
        point = json.loads((out / "points" / name / "point.json").read_text())
        assert (point["records"], point["step"]) == (records, steps)
        assert (out / "points" / name / "checkpoints" / str(steps) / "_CHECKPOINT_METADATA").exists()
        assert math.isfinite(point["metrics"]["eval/loss"]) and point["train_seconds"] > 0
        plan = json.loads((out / "points" / name / "plan.json").read_text())
        assert plan["config"]["data"]["fraction"] == float(name[1:]) and plan["config"]["steps"] == steps
        assert plan["config"]["optim"]["total_steps"] == steps
    rows = list(csv.DictReader((out / "scale.csv").open()))
    assert [r["fraction"] for r in rows] == ["0.25", "0.5", "1.0"]
    assert [int(r["records"]) for r in rows] == [12, 24, 48] and [int(r["steps"]) for r in rows] == [1, 1, 2]
    assert all(float(r["train_seconds"]) > 0 and math.isfinite(float(r["eval/loss"])) for r in rows)
    assert 5 < float(rows[0]["eval/loss"]) < 15   # a random tiny LLM over a 49k vocabulary: ~ln(49152) = 10.8
    md = (out / "scale.md").read_text()
    assert "| fraction | records | steps | train_seconds | eval/loss |" in md and "a=0 fixed" in md
    fit = json.loads((out / "fit.json").read_text())["fits"]["eval/loss"]
    assert fit["status"] == "ok" and fit["fixed"] == {"a": 0.0} and fit["free"] == ["b", "c"]
    assert all(math.isfinite(fit["params"][k]) for k in "abc")
    assert all(math.isfinite(fit["stderr"][k]) for k in "bc")
    png = (out / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image
    with Image.open(out / "scale.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300
    assert "f1.0: training 48 records for 2 steps" in said

    # every point is evaluated on the whole held-out suite, whatever its data.fraction (the fraction subsets
    # the training corpus only: tests/test_eval_fraction.py)
    from alm_jax.evaluation import EVALUATORS
    from alm_jax.export.source import load_run
    small = json.loads((out / "points" / "f0.25" / "point.json").read_text())["metrics"]["eval/loss"]
    losses = {}
    for fraction in ("1.0", "0.25"):
        run = load_run(out / "points" / "f0.25" / "checkpoints", overrides=[f"data.fraction={fraction}"])
        losses[fraction] = EVALUATORS["loss"](run.cfg, run.cfg.eval.corpus, batches=1, batch_size=8).run(
            run.model)["eval/loss"]
    assert small == pytest.approx(losses["1.0"], rel=1e-6) and losses["0.25"] == pytest.approx(small, rel=1e-6)

    # rerun: every point is skipped, nothing is trained or written into the checkpoints again
    before = _mtimes(out)
    assert before
    rc = _alm("scale", "--config", config, "--fractions", "0.25,0.5,1.0", "--out", out,
              "--budget", "steps-per-sample=0.3", "logging.every=1")
    assert rc == 0
    said = capsys.readouterr().out
    assert said.count(": skipped (finished") == 3 and "training" not in said
    assert _mtimes(out) == before

    # another budget for the same directory is refused, naming what changed
    assert _alm("scale", "--config", config, "--fractions", "0.25", "--out", out, "--budget",
                "steps-per-sample=3") == 1
    err = capsys.readouterr().err
    assert "planned with another config or budget" in err and "steps: 1 -> 5" in err


def test_scale_launch_runs_points_through_the_script(study, tmp_path, capsys):
    """A fourth point through a fake launch script (records its arguments, then runs `alm train`); the
    three finished points are skipped, and with four points the fit frees all three parameters."""
    config, out = study
    if not (out / "points" / "f1.0" / "point.json").exists():
        pytest.skip("needs the study of the test above")
    log = tmp_path / "launched.txt"
    script = tmp_path / "fake_launch.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      f"printf '%s\\n' \"$@\" >> {log}\n"
                      "shift\n"   # the script's own argument (e.g. a process count)
                      f"exec {sys.executable} -m alm_jax.cli train \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_before) if p)
    try:
        rc = _alm("scale", "--config", config, "--fractions", "0.25,0.5,0.75,1.0", "--out", out,
                  "--budget", "steps-per-sample=0.3", "--launch", f"{script} 2", "logging.every=1")
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = env_before
    assert rc == 0
    said = capsys.readouterr().out
    assert said.count(": skipped (finished") == 3
    args = log.read_text().split("\n")
    assert args[:2] == ["2", str(config)] and "data.fraction=0.75" in args and "steps=2" in args
    assert "logging.every=1" in args and "resume=auto" in args
    point = json.loads((out / "points" / "f0.75" / "point.json").read_text())
    assert (point["records"], point["step"]) == (36, 2) and math.isfinite(point["metrics"]["eval/loss"])
    fit = json.loads((out / "fit.json").read_text())["fits"]["eval/loss"]
    assert fit["points"] == 4 and fit["free"] == ["a", "b", "c"] and fit["fixed"] == {}
    assert fit["status"] in ("ok", "failed") and fit["note"] is not None   # 4 near-equal losses: said, not silent
    assert len(list(csv.DictReader((out / "scale.csv").open()))) == 4


def test_scale_refuses_a_config_without_held_out_data(tiny, tmp_path, capsys):
    cfg = tiny_config(_paths(tiny), tmp_path / "unused")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert _alm("scale", "--config", config, "--fractions", "0.5,1", "--out", tmp_path / "s", "--epochs", "1") == 1
    assert "nothing to evaluate the points on" in capsys.readouterr().err
    assert _alm("scale", "--config", config, "--fractions", "0.01,1", "--out", tmp_path / "s", "--epochs", "1",
                f"eval.corpus=[{_paths(tiny)['eval_corpus']}]") == 1
    assert "no full batch at fraction(s) 0.01" in capsys.readouterr().err
    assert _alm("scale", "--config", config, "--fractions", "0.5", "--out", tmp_path / "s") == 1
    assert "exactly one of --budget" in capsys.readouterr().err
    assert not (tmp_path / "s" / "points").exists()


def test_points_budget_steps(tiny, tmp_path):
    from alm_jax.scaling.study import Budget, parse_budget, parse_fractions, plan_points
    cfg = tiny_config(_paths(tiny), tmp_path / "unused")   # data.batch_size=8
    assert parse_fractions("1, 0.1,0.01") == [0.01, 0.1, 1.0]
    assert parse_budget("steps-per-sample=0.5", None) == Budget("steps_per_sample", 0.5)
    by_epochs = plan_points(cfg, [0.25, 1.0], Budget("epochs", 2), tmp_path / "s", sizes=[48, 20])
    # nested subsets per corpus: floor(0.25 * 48) + floor(0.25 * 20) = 17 records; 2 epochs of batches of 8
    assert [(p.records, p.steps, p.epochs) for p in by_epochs] == [(17, 4, 2), (68, 17, 2)]
    assert {"data.epochs=2", "steps=4", "optim.total_steps=4", "data.fraction=0.25", "resume=auto"} <= set(
        by_epochs[0].overrides)
    by_steps = plan_points(cfg, [0.5], Budget("steps_per_sample", 1.5), tmp_path / "s", sizes=[48],
                           schedule="config")
    assert (by_steps[0].records, by_steps[0].steps, by_steps[0].epochs) == (24, 5, 0)   # ceil(1.5 * 24 / 8)
    assert not any(o.startswith("optim.total_steps") for o in by_steps[0].overrides)
    assert by_steps[0].directory == tmp_path / "s" / "points" / "f0.5"
