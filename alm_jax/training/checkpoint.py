"""Training checkpoints: Orbax `CheckpointManager` with async save, keep policies, data-iterator state,
restore onto any mesh, `--resume` resolution and a SIGTERM/SIGINT guard.

One checkpoint step directory holds these items:

| item        | what                                               | Orbax args                              |
|-------------|----------------------------------------------------|-----------------------------------------|
| `state`     | pytree of jax.Arrays (trainable params, optimizer  | `StandardSave` / `StandardRestore`      |
|             | state, step, rng: whatever the trainer passes)     |                                         |
| `data`      | a Grain `DatasetIterator`'s state, one file per    | `grain.checkpoint.CheckpointSave/Restore` |
|             | process (`process_{i}-of-{n}.json`)                |                                         |
| `data_json` | alternative: a JSON-able dict (process 0 writes it)| `JsonSave` / `JsonRestore`              |
| `config`    | the run config as a dict                           | `JsonSave` / `JsonRestore`              |

Typical loop:

    ckpt = Checkpointer(cfg.checkpoint.dir, every=500, keep_last=3, keep_every=5000, config=to_dict(cfg))
    point = resolve_resume("auto", ckpt.directory)
    if point:
        state, _ = ckpt.restore(point.step, abstract_state, data_iterator=it)
    with PreemptionGuard() as guard:
        for step in range(start, total + 1):
            state, loss = train_step(state, next(it))
            stop = guard.should_stop(step)
            ckpt.save(step, state, data_state=it, force=stop)
            if stop:
                break
    ckpt.close()                                            # waits for the last async save

Restoring onto a different mesh: pass `abstract_state` whose `jax.ShapeDtypeStruct` leaves carry the NEW
shardings (`abstract_with_shardings`); Orbax reads each shard straight into its new place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from alm_jax.errors import CheckpointError

try:  # grain registers its Orbax args only when orbax is importable (it is: a hard dependency here)
    import grain
    from grain.checkpoint import CheckpointRestore as _GrainRestore, CheckpointSave as _GrainSave
except ImportError:  # pragma: no cover
    grain = None
    _GrainSave = _GrainRestore = None

STATE, DATA, DATA_JSON, CONFIG = "state", "data", "data_json", "config"


# ------------------------------------------------------------------------------------------- helpers


def abstract_with_shardings(tree, shardings=None):
    """`jax.ShapeDtypeStruct` for every array leaf of `tree`, carrying `shardings` (a matching pytree of
    `jax.sharding.Sharding`) or, when None, each leaf's own sharding. Non-array leaves pass through."""
    def one(x, s=None):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else getattr(x, "sharding", None))
    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


def key_name(k) -> str:
    """One pytree key's name in a dotted parameter path (a dict key, an attribute name or an index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_table(tree) -> dict[str, Any]:
    """'a.b.0.c' -> leaf, for every non-None leaf (the dotted names Orbax uses in its metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {".".join(key_name(k) for k in path): leaf for path, leaf in leaves if leaf is not None}


def _is_prng_key(dtype) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _describe_mismatch(stored, target) -> str | None:
    """What differs between the stored array metadata tree and the abstract target, or None."""
    have, want = _leaf_table(stored), _leaf_table(target)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = []
    for name in sorted(set(have) & set(want)):
        s, t = have[name], want[name]
        if _is_prng_key(getattr(t, "dtype", None)):
            continue  # stored as raw key data: a different shape by design
        s_shape, t_shape = getattr(s, "shape", None), getattr(t, "shape", None)
        if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
            shapes.append(f"{name}: checkpoint {tuple(s_shape)} vs model {tuple(t_shape)}")
    if not (missing or unexpected or shapes):
        return None

    def few(xs):
        return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
    parts = []
    if missing:
        parts.append(f"missing in the checkpoint: {few(missing)}")
    if unexpected:
        parts.append(f"in the checkpoint but not in the model: {few(unexpected)}")
    if shapes:
        parts.append(f"shape differs: {few(shapes)}")
    return "; ".join(parts)


def _detach_cpu_buffers(tree):
    """Copies the CPU-resident jax.Arrays of `tree`. On CPU, Orbax's "device-to-host" transfer is a
    zero-copy view, so an async save keeps the live buffers busy and the next step that donates them
    blocks until the whole write is done (measured: the full write time). A copy (~memcpy speed)
    decouples them. Accelerator arrays are left alone: Orbax copies those to host before returning."""
    def one(x):
        if isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.sharding.device_set):
            return jax.device_put(x, x.sharding, may_alias=False)
        return x
    return jax.tree.map(one, tree)


def _jsonable(d: Mapping) -> dict:
    try:
        return json.loads(json.dumps(d))  # a deep copy that also proves it is JSON-able
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"data_state must be a JSON-able dict (or a Grain DatasetIterator): {e}") from e


# ------------------------------------------------------------------------------------------- manager


@contextlib.contextmanager
def _quiet_read_only(read_only: bool):
    """Orbax warns on every read-only manager that it is read-only ("setting save_interval_steps=0",
    "Given directory is read only"): noise on a reader's stderr, so those two are dropped."""
    if not read_only:
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("read_only=True" in msg or "Given directory is read only" in msg)
    log = logging.getLogger("absl")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _item_handlers() -> dict:
    """Every item's handler, so that a fresh manager can read metadata and restore any subset."""
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA_JSON: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    if grain is not None:
        handlers[DATA] = grain.checkpoint.CheckpointHandler()
    return handlers


class Checkpointer:
    """Saves and restores training checkpoints under `directory` (one sub-directory per step).

    every: save when `step % every == 0` (0 = only forced saves). keep_last: keep the newest N (0 = all).
    keep_every: also keep every step that is a multiple of M (0 = none). async_save: return from `save`
    once the arrays are copied off the device; the write runs in the background (`wait()` finishes it).
    config: the run config dict, stored with every step as the `config` item.
    cpu_copy: for async saves of CPU arrays, save a copy so the next (donating) step does not wait for
    the write (see `_detach_cpu_buffers`); no effect on accelerators.
    """

    def __init__(self, directory: str | Path, *, every: int = 0, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, config: Mapping | None = None, read_only: bool = False,
                 cpu_copy: bool = True):
        if every < 0 or keep_last < 0 or keep_every < 0:
            raise CheckpointError(f"checkpoint every/keep_last/keep_every must be >= 0, "
                                  f"got {every}/{keep_last}/{keep_every}")
        self.directory = Path(directory).absolute()
        self.every = every
        self.async_save = async_save
        self.cpu_copy = cpu_copy
        self._config = _jsonable(config) if config is not None else None
        self._written: set[int] = set()   # steps this instance saved
        policies = [ocp.checkpoint_managers.LatestN(keep_last if keep_last > 0 else None)]
        if keep_every > 0 and keep_last > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        policy = policies[0] if len(policies) == 1 else ocp.checkpoint_managers.AnyPreservationPolicy(policies)
        try:
            with _quiet_read_only(read_only):
                options = ocp.CheckpointManagerOptions(
                    enable_async_checkpointing=async_save,
                    preservation_policy=policy,   # when to save is decided in `save` (every/force)
                    create=not read_only, read_only=read_only)
                self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        except Exception as e:  # noqa: BLE001 - Orbax raises many types; report them as one
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    @classmethod
    def from_config(cls, cfg, run_config: Mapping | None = None, **kw) -> "Checkpointer":
        """From a `CheckpointConfig` (dir, every, keep_last, keep_every, async_save)."""
        return cls(cfg.dir, every=cfg.every, keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                   async_save=cfg.async_save, config=run_config, **kw)

    # ---- queries

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None (an async save of it may still be writing: see `wait`)."""
        return self._mngr.latest_step()

    def saving_in_progress(self) -> bool:
        """True while an async save is still being written."""
        return self._mngr.is_saving_in_progress()

    # ---- save

    def save(self, step: int, state, data_state=None, force: bool = False) -> bool:
        """Saves `state` (pytree of jax.Arrays) and `data_state` (a Grain `DatasetIterator`, a JSON-able
        dict or None) at `step` if `step % every == 0` or `force`. Returns whether a save started.

        The iterator's state is read now (synchronously), so advancing it afterwards is safe; the
        arrays are copied off the device before an async save returns, so donating them is safe too.
        A step this instance already saved is skipped (e.g. a preemption save right after a regular one);
        a step that another run left in the directory raises CheckpointError: it is never kept in place of
        this run's state (the trainer discards or refuses such later steps before it trains)."""
        step = int(step)
        if not force and not (self.every > 0 and step % self.every == 0):
            return False
        if step in self._written:
            return False
        if step in self._mngr.all_steps():
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory} (written by an "
                                  "earlier run); it would not be replaced by this run's state. Resume from a "
                                  "later step, or discard the later steps (resume_discard_later=true)")
        if self.async_save and self.cpu_copy:
            state = _detach_cpu_buffers(state)
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            if grain is not None and isinstance(data_state, grain.DatasetIterator):
                items[DATA] = _GrainSave(data_state)
            elif isinstance(data_state, Mapping):
                items[DATA_JSON] = ocp.args.JsonSave(_jsonable(data_state))
            else:
                raise CheckpointError(f"data_state must be a grain DatasetIterator or a JSON-able dict, "
                                      f"got {type(data_state).__name__}")
        if self._config is not None:
            items[CONFIG] = ocp.args.JsonSave(self._config)
        try:
            started = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: {e}") from e
        if started:
            self._written.add(step)
        return started

    def wait(self) -> None:
        """Blocks until every pending async save is written (and re-raises its error)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"an async checkpoint save to {self.directory} failed: {e}") from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.wait()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- restore

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}; start without --resume "
                                      "or point it at a directory that holds step sub-directories")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"checkpoint step {step} does not exist in {self.directory}; "
                                  f"available steps: {steps or 'none'}")
        return int(step)

    def restore(self, step: int | None, abstract_state, data_iterator=None, *, only: str | None = None):
        """Restores `(state, data_state)` from `step` (None = latest).

        abstract_state: pytree of `jax.ShapeDtypeStruct` with the target shardings (any mesh).
        data_iterator: a Grain DatasetIterator to restore in place (its state is also returned as
        `data_state`). Without it, `data_state` is the saved dict (JSON item or this process's Grain
        state), or None when the step has no data state.
        only: restore just this key of the saved state dict (e.g. "trainable"), which `abstract_state` then
        describes; the rest (e.g. the optimizer state) and the data state are not read.
        Raises CheckpointError when the step is missing, corrupt or does not match `abstract_state`."""
        step = self._check_step(step)
        step_dir = self._step_dir(step)
        if not (step_dir / STATE).is_dir():
            raise CheckpointError(f"checkpoint {step_dir} has no '{STATE}' item; it is incomplete or not "
                                  "written by alm_jax")
        try:
            stored = self._mngr.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step_dir} is unreadable (corrupt or partial?): {e}") from e
        stored_tree = getattr(stored, "tree", stored)
        if stored_tree is None:
            raise CheckpointError(f"checkpoint {step_dir}/{STATE} has no readable metadata (corrupt?)")
        if only is not None:
            if not isinstance(stored_tree, Mapping) or only not in stored_tree:
                raise CheckpointError(f"checkpoint {step_dir} has no {only!r} in its state; it was not written "
                                      "by the alm_jax trainer")
            stored_tree, abstract_state = stored_tree[only], {only: abstract_state}
        diff = _describe_mismatch(stored_tree, abstract_state[only] if only is not None else abstract_state)
        if diff:
            raise CheckpointError(f"checkpoint {step_dir} does not match the model/optimizer state: {diff}. "
                                  "Resume with the same model, LoRA and optimizer config, or start fresh.")

        if only is not None:   # a strict subtree, read straight from the state item (no other item)
            try:
                target = ocp.checkpoint_utils.construct_restore_args(abstract_state)
                out = ocp.PyTreeCheckpointer().restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=target, partial_restore=True))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"restoring {only!r} from checkpoint {step_dir} failed (corrupt, partial "
                                      f"or incompatible): {type(e).__name__}: {e}") from e
            return out[only], None
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_grain, has_json = (step_dir / DATA).is_dir(), (step_dir / DATA_JSON).is_dir()
        if data_iterator is not None:
            if has_grain:
                items[DATA] = _GrainRestore(data_iterator)
            elif has_json:
                items[DATA_JSON] = ocp.args.JsonRestore()
            else:
                raise CheckpointError(f"checkpoint {step_dir} holds no data-iterator state, but a data "
                                      "iterator was given to restore")
        elif has_json:
            items[DATA_JSON] = ocp.args.JsonRestore()
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"restoring checkpoint {step_dir} failed (corrupt, partial or "
                                  f"incompatible): {type(e).__name__}: {e}") from e
        data_state = None
        if DATA_JSON in items:
            data_state = dict(out[DATA_JSON])
            if data_iterator is not None:
                data_iterator.set_state(copy.deepcopy(data_state))
        elif data_iterator is not None:
            data_state = data_iterator.get_state()
        elif has_grain:
            data_state = self._read_grain_state(step_dir)
        return out[STATE], data_state

    @staticmethod
    def _read_grain_state(step_dir: Path) -> dict | None:
        f = step_dir / DATA / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not f.exists():
            raise CheckpointError(f"{step_dir / DATA} has no iterator state for process "
                                  f"{jax.process_index()} of {jax.process_count()}; the Grain state is per "
                                  "process, so resume with the same number of processes")
        return json.loads(f.read_text())

    def restore_config(self, step: int | None = None) -> dict | None:
        """The run config stored with `step` (None = latest), or None if none was stored."""
        step = self._check_step(step)
        if not (self._step_dir(step) / CONFIG).is_dir():
            return None
        try:
            return dict(self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"reading the config of checkpoint {self._step_dir(step)} failed: {e}") from e


# ------------------------------------------------------------------------------------------- resume


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    directory: Path   # the checkpoint root (holds step sub-directories)
    step: int


def _steps_in(root: Path) -> list[int]:
    """Finished step directories (Orbax writes commits atomically: unfinished ones carry a tmp suffix)."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)
                  and (p / "_CHECKPOINT_METADATA").exists())


_STEP_ENTRY = re.compile(r"(\d+)(\.orbax-checkpoint-tmp.*)?")
DIVERGED_DIR = "diverged"


def step_entries(root: str | Path) -> list[tuple[int, Path, str]]:
    """Every step entry under `root`, finished or not: `(step, path, kind)`, kind "finished" (what
    `resolve_resume` can pick), "incomplete" (a step directory without Orbax's commit metadata: corrupt or
    half-copied) or "unfinished" (an interrupted save's tmp directory). Sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_ENTRY.fullmatch(p.name)
        if not m:
            continue
        kind = "unfinished" if m.group(2) else ("finished" if (p / "_CHECKPOINT_METADATA").exists() else "incomplete")
        out.append((int(m.group(1)), p, kind))
    return sorted(out, key=lambda e: (e[0], e[1].name))


def remove_entries(paths) -> None:
    """Deletes step directories (or stray files named like one)."""
    import shutil
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def set_aside(root: str | Path, steps, into: str = DIVERGED_DIR) -> list[int]:
    """Moves the finished step directories `steps` of `root` into `root/<into>/` (out of reach of
    `resolve_resume` and `Checkpointer`, still on disk for inspection). Returns the steps moved."""
    root, moved = Path(root), []
    wanted = {int(s) for s in steps}
    for step, path, _ in step_entries(root):
        if step in wanted:
            dest = root / into / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            remove_entries([dest])
            path.rename(dest)
            moved.append(step)
    return moved


def resolve_resume(mode: str | int | None, directory: str | Path) -> ResumePoint | None:
    """What `--resume` means. `directory` is the run's checkpoint root.

    - "none" / None: start fresh (None).
    - "auto": the latest finished step in `directory`, or None when there is none.
    - an int (or digits): that step in `directory`; CheckpointError if it does not exist.
    - a path: a step directory (`.../checkpoints/1200`) or a checkpoint root (its latest step).
    """
    root = Path(directory)
    if mode is None or (isinstance(mode, str) and mode.lower() == "none"):
        return None
    if isinstance(mode, str) and mode.lower() == "auto":
        steps = _steps_in(root)
        return ResumePoint(root.absolute(), steps[-1]) if steps else None
    if isinstance(mode, bool):
        raise CheckpointError(f"--resume {mode!r}: use auto, none, a step number or a checkpoint path")
    if isinstance(mode, int) or (isinstance(mode, str) and mode.isdigit()):
        step, steps = int(mode), _steps_in(root)
        if step not in steps:
            raise CheckpointError(f"--resume {step}: no finished checkpoint at step {step} in {root}; "
                                  f"available: {steps or 'none'}")
        return ResumePoint(root.absolute(), step)
    path = Path(mode)
    if not path.exists():
        raise CheckpointError(f"--resume {mode!r}: path does not exist (use auto, none, a step number or a "
                              "checkpoint path)")
    if re.fullmatch(r"\d+", path.name) and (path / "_CHECKPOINT_METADATA").exists():
        return ResumePoint(path.parent.absolute(), int(path.name))
    steps = _steps_in(path)
    if not steps:
        raise CheckpointError(f"--resume {mode!r}: no finished checkpoint step directories in {path}")
    return ResumePoint(path.absolute(), steps[-1])


# ------------------------------------------------------------------------------------------- preemption


class PreemptionGuard:
    """Context manager: SIGTERM/SIGINT set `requested` instead of killing the process, so the loop can
    save at the current step and exit cleanly. A second signal of the same kind restores the previous
    handler and re-delivers the signal (Ctrl-C twice still interrupts). Previous handlers come back on exit.

    Multi-process: call `should_stop(step)` at the same steps on every process; it agrees across
    processes (any process signalled -> all stop at that step) with one tiny host all-gather every
    `check_every` steps.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), check_every: int = 1):
        self.signals = tuple(signals)
        self.check_every = max(1, int(check_every))
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == self.signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python signal handlers)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()
        return False

    def should_stop(self, step: int) -> bool:
        """True when the loop should save at `step` and exit; identical on every process."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.asarray(flags).any())


def restore_params(model, directory: str | Path, step: int | None = None, *, mesh=None):
    """`model` (an `AudioLanguageModel` built from the run's config) with what its run learned (connector +
    LoRA weights, and the running state `models.alm.RUNNING_STATE` when it has one) read from the training
    checkpoint in `directory` at `step` (None = latest), in place; no optimizer is built and the optimizer state
    is not read. `mesh`: the restored arrays are laid out on it by their logical axes (as training lays them
    out; what the model was built on), whatever mesh the checkpoint was written from; None = each parameter's
    current placement. Returns `(model, step)`."""
    from flax import nnx

    from alm_jax.models.alm import RUNNING_STATE, split_trainable
    _, trainable, _ = split_trainable(model)
    stats = nnx.state(model, RUNNING_STATE)   # BatchNorm statistics + dropout counters, saved as "model_state"
    reader = Checkpointer(directory, read_only=True)
    try:
        step = reader._check_step(step)
        restored, _ = reader.restore(step, _targets(trainable, mesh), only="trainable")
        nnx.update(model, restored)
        if jax.tree.leaves(stats):
            restored, _ = reader.restore(step, _targets(stats, mesh), only="model_state")
            nnx.update(model, restored)
    finally:
        reader.close()
    return model, step


def _targets(state, mesh):
    """Restore targets for an nnx state: on `mesh` by logical axes (`sharding.state_shardings`), or where it is."""
    if mesh is None:
        return abstract_with_shardings(state)
    from alm_jax.sharding import state_shardings
    return abstract_with_shardings(state, state_shardings(state, mesh))


def save_trained(model, directory: str | Path, step: int, config: Mapping | None = None) -> None:
    """The inverse of `restore_params`: writes what `model` learned (connector + LoRA weights, and its running
    state when it has one) as step `step` of a checkpoint directory that `restore_params` / `alm eval` /
    `alm export` read, with the run `config` (a dict) when given. No optimizer state."""
    from flax import nnx

    from alm_jax.models.alm import RUNNING_STATE, split_trainable
    state = {"trainable": split_trainable(model)[1]}
    running = nnx.state(model, RUNNING_STATE)
    if jax.tree.leaves(running):
        state["model_state"] = running
    ckpt = Checkpointer(directory, async_save=False, config=config)
    try:
        ckpt.save(step, state, force=True)
    finally:
        ckpt.close()


def read_learned(directory: str | Path, step: int | None, prefixes) -> tuple[dict[str, np.ndarray], int]:
    """The learned arrays of a training checkpoint under dotted `prefixes` (e.g. "connector.adapters.0"):
    `({path: array}, step)`, paths relative to the model ("connector.adapters.0.conv1.kernel"), read from its
    `trainable` item and the BatchNorm statistics of its `model_state` (dropout counters are not read). Only
    the selected arrays are read; no model of the earlier run is built (`training/staged.py::init_from_runs`)."""
    reader = Checkpointer(directory, read_only=True)
    try:
        step = reader._check_step(step)
        step_dir = reader._step_dir(step)
        try:
            stored = reader._mngr.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step_dir} is unreadable (corrupt or partial?): {e}") from e
    finally:
        reader.close()
    tree = getattr(stored, "tree", stored)
    if not isinstance(tree, Mapping) or "trainable" not in tree:
        raise CheckpointError(f"checkpoint {step_dir} has no trained parameters; it was not written by alm_jax")
    prefixes = tuple(prefixes)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    names: dict[tuple, str] = {}

    def select(item: str, node, path: tuple):
        if isinstance(node, Mapping):
            out = {k: select(item, v, path + (str(k),)) for k, v in node.items()}
            return {k: v for k, v in out.items() if v is not None} or None
        name = ".".join(path[:-1] if path and path[-1] == "value" else path)
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            return None
        dtype = np.dtype(getattr(node, "dtype", np.float32))
        if item == "model_state" and not np.issubdtype(dtype, np.floating):
            return None   # a dropout counter
        names[(item,) + path] = name
        return jax.ShapeDtypeStruct(tuple(node.shape), dtype, sharding=cpu)

    abstract = {item: sub for item in ("trainable", "model_state") if item in tree
                and (sub := select(item, tree[item], ())) is not None}
    if not abstract:
        return {}, step
    try:
        out = ocp.PyTreeCheckpointer().restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"reading {list(prefixes)} from checkpoint {step_dir} failed: "
                              f"{type(e).__name__}: {e}") from e
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        found[names[tuple(key_name(k) for k in path)]] = np.asarray(leaf)
    return found, step
