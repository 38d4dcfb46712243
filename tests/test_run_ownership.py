"""A run owns its checkpoint directory and ends honestly (issue 18): resuming an older step refuses, or discards
the later steps; a changed config is refused naming the keys unless allowed (and the accepted change is recorded);
an epoch-limited run checkpoints when the data runs out; config mistakes are one `alm: error:` line; a divergence
leaves no diverged checkpoint behind; a preempted `alm train` exits 75; metrics rows are never repeated.

Four short in-process trainings in all (a base run, a resume that runs out of data, a discarding resume, a
diverging run), sharing one persistent compilation cache."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from alm_jax.config import (DivergenceConfig, check_resume_changes, load_config, resume_config_changes, to_dict,
                            validate_train_config)
from alm_jax.errors import ConfigError, DataError
from alm_jax.training.checkpoint import Checkpointer, resolve_resume, set_aside, step_entries
from alm_jax.training.divergence import DivergenceGuard
from alm_jax.training.metrics import read_metrics
from tiny_setup import tiny_config


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The trainings here compile the same step: a persistent compilation cache lets them share it."""
    import jax
    try:
        from jax._src import compilation_cache as cc
    except ImportError:   # pragma: no cover - only slower
        yield
        return
    keys = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax-cache")),
            "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {k: jax.config.values[k] for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _paths(tiny) -> dict:
    return json.loads((tiny / "paths.json").read_text())


def _cfg(tiny, run_dir: Path, *extra):
    return tiny_config(_paths(tiny), run_dir, "checkpoint.every=2", "checkpoint.keep_last=0", "logging.every=1",
                       "data.epochs=1", "steps=4", *extra)


def _finished(ckpt: Path) -> list[int]:
    return [s for s, _, kind in step_entries(ckpt) if kind == "finished"]


def _trainable(ckpt: Path, step: int) -> dict:
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")["trainable"]


def _logged(run: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run) if "event" not in row]


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory) -> Path:
    """4 steps of data.epochs=1 over the 48-record corpus (6 batches of 8), checkpoints at 2 and 4."""
    from alm_jax.training.trainer import train
    run_dir = tmp_path_factory.mktemp("base") / "run"
    r = train(_cfg(tiny, run_dir))
    assert r.stopped_by == "done" and _finished(run_dir / "ckpt") == [2, 4] and _logged(run_dir) == [1, 2, 3, 4]
    return run_dir


def _copy(base_run, tmp_path, debris=False) -> Path:
    """The base run's directory; with `debris`, as if a later run had been there too: a finished step 6, a
    step directory without commit metadata (8) and an interrupted save's tmp directory (9)."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    if debris:
        ckpt = run / "ckpt"
        shutil.copytree(ckpt / "4", ckpt / "6")
        shutil.copytree(ckpt / "4", ckpt / "8")
        (ckpt / "8" / "_CHECKPOINT_METADATA").unlink()
        (ckpt / "9.orbax-checkpoint-tmp-1234").mkdir()
    return run


# ---- item 5: an epoch-limited run that runs out of data checkpoints and ends cleanly (+ item 7's metrics rows)


def test_epoch_limited_run_checkpoints_and_stops_when_the_data_runs_out(tiny, base_run, tmp_path):
    from alm_jax.training.trainer import train
    run = _copy(base_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:   # a run that logged 5 and 6, then was killed before a checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    r = train(_cfg(tiny, run, "steps=20", "checkpoint.every=4"))     # resume=auto: from 4
    assert r.stopped_by == "data_exhausted" and r.step == 6 and sorted(r.losses) == [5, 6]
    assert _finished(run / "ckpt") == [2, 4, 6]          # 6 is no multiple of every=4: the exhaustion checkpoint
    assert _logged(run) == [1, 2, 3, 4, 5, 6]            # each step once: the killed run's 5 and 6 moved aside
    assert [json.loads(x)["loss"] for x in (run / "metrics.discarded.jsonl").read_text().splitlines()] == [1.0, 1.0]


# ---- item 1: resuming from an older step mixes two runs


def test_resuming_an_older_step_is_refused_naming_the_later_steps(tiny, base_run, tmp_path):
    from alm_jax.training.trainer import train
    run = _copy(base_run, tmp_path, debris=True)
    with pytest.raises(ConfigError) as e:
        train(_cfg(tiny, run, "resume='2'"))
    msg = str(e.value)
    assert "continues from step 2" in msg and "later steps [4, 6, 8 (incomplete)]" in msg
    assert "resume_discard_later=true" in msg
    with pytest.raises(ConfigError, match=r"later steps \[8 \(incomplete\)\]"):   # auto: 6, then a corrupt 8
        train(_cfg(tiny, run))
    with pytest.raises(ConfigError, match="resume_discard_later=true"):           # fresh over an old run
        train(_cfg(tiny, run, "resume=none"))
    assert [s for s, _, _ in step_entries(run / "ckpt")] == [2, 4, 6, 8, 9]       # nothing was touched


def test_discarding_the_later_steps_trains_one_timeline(tiny, base_run, tmp_path):
    """Items 1, 2 and 7 (metrics): the later steps go, the new run's step 4 replaces the old one, the accepted
    config change is recorded, and metrics.jsonl holds every step once."""
    from alm_jax.training.trainer import train
    run = _copy(base_run, tmp_path, debris=True)
    ckpt = run / "ckpt"
    old_4 = _trainable(ckpt, 4)
    r = train(_cfg(tiny, run, "resume=2", "resume_discard_later=true", "data.seed=1",
                   "resume_allow_changes=[data.seed]"))
    assert r.stopped_by == "done" and r.step == 4 and sorted(r.losses) == [3, 4]
    assert [s for s, _, _ in step_entries(ckpt)] == [2, 4]                        # 6, 8 and the tmp dir are gone
    new_4 = _trainable(ckpt, 4)                                                   # this run's step 4, not the old
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(old_4), _leaves(new_4)))
    assert resolve_resume("auto", ckpt).step == 4
    with Checkpointer(ckpt, read_only=True) as ro:
        assert ro.restore_config(4)["data"]["seed"] == 1                         # the next resume compares to it
    assert _logged(run) == [1, 2, 3, 4]                                           # once each
    (event,) = [row for row in read_metrics(run) if "event" in row]
    assert event["event"] == "resume" and event["step"] == 2 and event["from_step"] == 2
    assert event["config_changes"] == {"data.seed": [0, 1]} and event["discarded_steps"] == [4, 6, 8]
    discarded = [json.loads(x)["step"] for x in (run / "metrics.discarded.jsonl").read_text().splitlines()]
    assert discarded == [3, 4]


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ---- item 2: a changed config is refused naming the keys


def test_a_changed_config_is_refused_naming_the_keys(tiny, base_run, tmp_path):
    from alm_jax.training.trainer import train
    run = _copy(base_run, tmp_path)
    with pytest.raises(ConfigError) as e:
        train(_cfg(tiny, run, "data.seed=1", "optim.lr=2e-3"))
    msg = str(e.value)
    assert "data.seed: 0 -> 1" in msg and "optim.lr: 0.001 -> 0.002" in msg
    assert "resume_allow_changes=[data.seed,optim.lr]" in msg
    with pytest.raises(ConfigError) as e:                 # allowing one (here: its section) still names the other
        train(_cfg(tiny, run, "data.seed=1", "optim.lr=2e-3", "resume_allow_changes=[optim]"))
    assert "data.seed: 0 -> 1" in str(e.value) and "resume_allow_changes=[data.seed]" in str(e.value)
    assert "optim.lr:" not in str(e.value)
    with pytest.raises(ConfigError, match="'optim.lrr' is not a key that resuming compares"):
        train(_cfg(tiny, run, "optim.lr=2e-3", "resume_allow_changes=[optim.lrr]"))
    with pytest.raises(ConfigError, match="not a key that resuming compares"):   # free keys need no permission
        train(_cfg(tiny, run, "resume_allow_changes=[logging.every]"))
    # what may change freely: logging, checkpointing, evals, the mesh, the step count, the guards
    stored = to_dict(_cfg(tiny, run))
    free = to_dict(_cfg(tiny, tmp_path / "elsewhere", "steps=50", "logging.every=3", "mesh.data=1",
                        "checkpoint.every=5", "checkpoint.keep_last=2", "eval.every=0", "max_bad_steps=2",
                        "divergence.max_loss_ratio=4", "sync_every_step=on"))
    assert resume_config_changes(stored, free) == {}
    math_ = to_dict(_cfg(tiny, run, "model.connector.num_queries=8", "seed=3"))
    assert resume_config_changes(stored, math_) == {"model.connector.num_queries": (4, 8), "seed": (0, 3)}
    assert check_resume_changes({"seed": (0, 3)}, ("seed",), math_, "x") == {"seed": (0, 3)}
    # a stored config from before a key existed compares that key with its default
    del stored["data"]["shards"]
    assert resume_config_changes(stored, to_dict(_cfg(tiny, run))) == {}


# ---- item 5 (the rest) and item 7 (steps=-5): one `alm: error:` line, exit status 1


def _yaml(tiny, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(_cfg(tiny, tmp_path / "run"))))
    return path


def _one_error(capsys, argv) -> str:
    from alm_jax.cli import main
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alm: error: "), err
    return err[0]


@pytest.mark.parametrize("override,needle", [
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("steps=-5", "steps=-5: must be >= 1"),
    ("optim.grad_accum=3", "optim.grad_accum=3: must divide data.batch_size=8"),
    ("divergence.max_loss_ratio=0.5", "divergence.max_loss_ratio=0.5: must be 0 (off) or > 1"),
    ("resume=9", "--resume 9: no finished checkpoint at step 9"),   # an int is a step (not "expected a string")
])
def test_config_mistakes_are_one_clear_error(override, needle, tiny, tmp_path, capsys):
    line = _one_error(capsys, ["train", str(_yaml(tiny, tmp_path)), override, "--distributed", "off"])
    assert needle in line


def test_resume_accepts_an_int_step():
    assert load_config(None, ["resume=9"]).resume == 9
    assert load_config(None, ["resume=auto"]).resume == "auto"
    with pytest.raises(ConfigError, match="a step number must be >= 1"):
        validate_train_config(load_config(None, ["resume=0"]))


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.dir"])
def test_a_file_where_a_directory_belongs_is_one_clear_error(key, tiny, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _one_error(capsys, ["train", str(_yaml(tiny, tmp_path)), f"{key}={blocker}", "--distributed", "off"])
    assert f"{key}={blocker} is a file, not a directory" in line
    line = _one_error(capsys, ["train", str(_yaml(tiny, tmp_path)), f"{key}={blocker}/sub", "--distributed", "off"])
    assert f"{key}={blocker}/sub cannot be created" in line


# ---- item 7: exit codes, divergence


@pytest.mark.parametrize("stopped_by,code", [("preempted", 75), ("done", 0), ("data_exhausted", 0)])
def test_train_exit_status_tells_preempted_from_finished(stopped_by, code, tiny, tmp_path, capsys, monkeypatch):
    import alm_jax.training.trainer as trainer
    from alm_jax.cli import main
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: trainer.TrainResult(
        step=7, losses={7: 1.0}, skipped_steps=0, stopped_by=stopped_by, bad_samples={}))
    assert main(["train", str(_yaml(tiny, tmp_path)), "--distributed", "off"]) == code
    assert stopped_by in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    assert "75 preempted" in train_help and "EX_TEMPFAIL" in train_help


def test_a_blow_up_leaves_no_diverged_checkpoint(tiny, tmp_path):
    """lr 1e30: the first update overflows the parameters. Before, steps 1-5 were saved with those parameters
    and step 5 was called "the last good checkpoint"."""
    from alm_jax.training.trainer import train
    run = tmp_path / "run"
    with pytest.raises(DataError) as e:
        train(_cfg(tiny, run, "optim.lr=1e30", "checkpoint.every=1", "data.epochs=0", "steps=8"))
    msg = str(e.value)
    assert "training diverged at step 1" in msg and "divergence.max_param_ratio=10" in msg
    assert "No good checkpoint of this run is left" in msg
    assert _finished(run / "ckpt") == []                                  # the diverged state was never saved
    (event,) = [row for row in read_metrics(run) if "event" in row]
    assert event["event"] == "diverged" and event["step"] == 1 and event["metric"] == "param_norm"


def test_divergence_guard_bounds_and_set_aside(tmp_path):
    """The guard's arithmetic (which states a spike condemns), and set_aside moving them out of reach."""
    g = DivergenceGuard(DivergenceConfig(window=4, min_history=2), param_norm=10.0)
    assert g.check(1, loss=2.0, grad_norm=1.0, param_norm=10.1) is None
    assert g.check(2, loss=50.0, grad_norm=1.0, param_norm=10.2) is None       # 1 healthy step: too few to judge
    assert g.check(3, loss=float("nan"), grad_norm=1.0, param_norm=10.2, skipped=True) is None   # not history
    hit = g.check(4, loss=400.0, grad_norm=1.0, param_norm=10.3)    # median of [2, 50] = 26; 400 > 260
    assert (hit.metric, hit.good_bound, hit.history) == ("loss", 2, 2) and "15.4x the median 26" in hit.describe()
    hit = g.check(5, loss=2.0, grad_norm=1.0, param_norm=float("inf"))    # an update that overflowed
    assert (hit.metric, hit.good_bound) == ("param_norm", 4)
    assert DivergenceGuard(DivergenceConfig(max_param_ratio=0), param_norm=1.0).check(
        1, loss=1.0, grad_norm=1.0, param_norm=1e9) is None                       # 0 = off
    # set_aside: the condemned steps leave the checkpoint root; the rest (and Orbax) carry on
    with Checkpointer(tmp_path, async_save=False) as ck:
        for s in (2, 3, 4):
            ck.save(s, {"w": jnp.full(2, float(s))}, force=True)
    assert set_aside(tmp_path, [3, 4]) == [3, 4]
    assert sorted(p.name for p in (tmp_path / "diverged").iterdir()) == ["3", "4"]
    assert resolve_resume("auto", tmp_path).step == 2
    with Checkpointer(tmp_path, async_save=False) as ck:
        assert ck.all_steps() == [2] and ck.save(3, {"w": jnp.zeros(2)}, force=True)
        assert ck.all_steps() == [2, 3]


def test_a_loss_spike_sets_aside_the_checkpoint_that_produced_it(tiny, base_run, tmp_path, monkeypatch):
    """The trainer's side of a loss spike at step 6 (forced here): the state of step 5 produced it, so its
    checkpoint moves to diverged/, step 6 is never saved, and resume=auto continues from 4."""
    import alm_jax.training.trainer as trainer
    from alm_jax.training.divergence import Divergence

    class SpikeAt6(DivergenceGuard):
        def check(self, step, **kw):
            return Divergence(step, "loss", 500.0, 10.0, 5, 10.0, step - 2) if step == 6 else None
    monkeypatch.setattr(trainer, "DivergenceGuard", SpikeAt6)
    run = _copy(base_run, tmp_path)
    with pytest.raises(DataError) as e:
        trainer.train(_cfg(tiny, run, "checkpoint.every=1", "steps=6"))
    msg = str(e.value)
    assert "training diverged at step 6: the loss was 500, 50x the median 10" in msg
    assert f"The checkpoints of the states that produced it ([5]) were moved to {run / 'ckpt'}/diverged/" in msg
    assert "The last good checkpoint is step 4" in msg
    assert _finished(run / "ckpt") == [2, 4] and (run / "ckpt" / "diverged" / "5" / "state").is_dir()
    assert resolve_resume("auto", run / "ckpt").step == 4


# ---- fault matrix: a damaged Orbax step

@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_step_stops_naming_it_and_the_fix(damage, tiny, base_run, tmp_path):
    from alm_jax.errors import CheckpointError
    from alm_jax.training.trainer import train
    run = _copy(base_run, tmp_path)
    files = sorted(p for p in (run / "ckpt" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size > 64)
    assert files
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(len(data)))
    with pytest.raises(CheckpointError) as e:
        train(_cfg(tiny, run, "resume=auto"))
    msg = str(e.value)
    assert "4" in msg and "resume=2" in msg and "resume_discard_later=true" in msg, msg
    # the fix it names works: resume from step 2, discarding the damaged step, trains on to the end
    r = train(_cfg(tiny, run, "resume=2", "resume_discard_later=true"))
    assert r.step == 4 and _finished(run / "ckpt") == [2, 4]
