"""`alm scale`: a data-size study. One ordinary checkpointed training run per fraction of the training data
(`data.fraction`: nested subsets, so the records of a smaller point are inside every larger one), each
evaluated on one fixed held-out suite when its training ends, then a table, a power-law fit and a figure.

    alm scale --config C --fractions 0.01,0.03,0.1,0.3,1.0 --out DIR (--budget steps-per-sample=K | --epochs E)
              [--launch "SCRIPT ARGS"] [key=value ...]

Budget. `--budget steps-per-sample=K`: a point of `records` training records (the subset's exact size:
max(1, floor(fraction * n)) per corpus) trains `steps = ceil(K * records / data.batch_size)` steps, repeating
the subset as needed (`data.epochs=0`); `--epochs E`: `data.epochs=E` and `steps = floor(E * records /
data.batch_size)` (the last partial batch of the E passes is dropped, as the pipeline does). Each point's
learning-rate schedule spans its own run (`optim.total_steps = steps`; `--schedule config` keeps the
config's).

Layout. `DIR/points/f<fraction>/` is a point (`f0.01`, `f1.0`): its `checkpoints/` (checkpoint.dir),
`metrics.jsonl` (logging.dir), `plan.json` (its resolved config and budget), `train.json` (steps done,
seconds) and, once evaluated, `point.json` (everything plus the metrics). `DIR/scale.csv`, `DIR/scale.md`
(the table), `DIR/fit.json` (metric(n) = a + b * n^(-c) per metric, `alm_jax/scaling/fit.py`) and
`DIR/scale.png` (`alm_jax/scaling/plot.py`) are rewritten at the end of every invocation.

Held-out suite: the loss on the config's `eval.corpus` (`--eval-batches` batches of `--eval-batch-size`,
default `eval.batches` x `data.batch_size`, read in order: the same samples for every point) plus every suite
in `eval.evaluators` / `eval.suites`, run on the point's final checkpoint with `data.fraction=1` (the data
pipeline subsets every corpus it reads by `data.fraction`, the held-out ones too).

Resuming. Rerunning the same command skips every finished point (its `point.json` and its final checkpoint
are there) and continues the others: an interrupted run resumes from its last checkpoint (`resume=auto`),
a trained but unevaluated point is only evaluated, a point whose eval settings changed is evaluated again.
A point trained with a different config or budget is refused (use another --out, or delete that point).

`--launch "SCRIPT ARGS"` trains each point with `SCRIPT ARGS CONFIG OVERRIDE...` (the arguments of
`alm train`, e.g. `launch/local_multihost.sh 2`); the points are evaluated here once every launch is done, so
this process never holds an accelerator while a point trains.

Exit status: 0 done, 75 a point was preempted (rerun the same command to continue), 1 failed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from alm_jax.config import RESUME_FREE_KEYS, TrainConfig, flatten_config, load_config, to_dict
from alm_jax.errors import AlmError, CheckpointError, ConfigError

EXIT_PREEMPTED = 75   # as `alm train` (alm_jax/cli.py): preempted after checkpointing; rerun continues
PLAN, TRAIN, POINT = "plan.json", "train.json", "point.json"
MAX_PANELS = 6
# config keys that may differ between a point's stored plan and this invocation without retraining it
_FREE = tuple(k for k in RESUME_FREE_KEYS if k != "steps")


def _say(msg: str) -> None:
    print(f"alm scale: {msg}", flush=True)


# ------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each point trains: `steps_per_sample` (steps = ceil(K * records / batch)) or `epochs`."""
    kind: str      # "steps_per_sample" | "epochs"
    value: float

    def describe(self) -> str:
        return f"steps-per-sample={self.value:g}" if self.kind == "steps_per_sample" else f"epochs={int(self.value)}"


def parse_budget(budget: str | None, epochs: int | None) -> Budget:
    if (budget is None) == (epochs is None):
        raise ConfigError("give exactly one of --budget steps-per-sample=K (steps = ceil(K * records / "
                          "data.batch_size)) and --epochs E (E passes over each subset)")
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs {epochs}: must be >= 1")
        return Budget("epochs", int(epochs))
    key, _, raw = budget.partition("=")
    if key.strip() != "steps-per-sample" or not raw:
        raise ConfigError(f"--budget {budget!r}: expected steps-per-sample=K (K > 0, e.g. steps-per-sample=0.5)")
    try:
        k = float(raw)
    except ValueError:
        raise ConfigError(f"--budget {budget!r}: K={raw!r} is not a number") from None
    if not (math.isfinite(k) and k > 0):
        raise ConfigError(f"--budget {budget!r}: K must be a finite number > 0")
    return Budget("steps_per_sample", k)


def parse_fractions(text: str) -> list[float]:
    """"0.01,0.1,1" -> [0.01, 0.1, 1.0] (sorted, each in (0, 1], no repeats)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            f = float(part)
        except ValueError:
            raise ConfigError(f"--fractions: {part!r} is not a number") from None
        if not 0 < f <= 1:
            raise ConfigError(f"--fractions: {part} must be in (0, 1] (a fraction of data.corpus)")
        if f in out:
            raise ConfigError(f"--fractions names {part} twice")
        out.append(f)
    if not out:
        raise ConfigError("--fractions is empty; give e.g. --fractions 0.01,0.03,0.1,0.3,1.0")
    return sorted(out)


def point_name(fraction: float) -> str:
    return f"f{float(fraction)!r}"


@dataclasses.dataclass(frozen=True)
class Point:
    fraction: float
    records: int
    steps: int
    epochs: int                # data.epochs of the run (0: repeat the subset)
    directory: Path
    overrides: tuple[str, ...]  # what the study sets on top of the user's overrides

    @property
    def name(self) -> str:
        return point_name(self.fraction)

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints"


def corpus_sizes(cfg: TrainConfig) -> list[int]:
    """Records of each `data.corpus` directory."""
    from alm_jax.data.corpus import Corpus
    if not cfg.data.corpus:
        raise ConfigError("data.corpus is empty; a data-size study subsets the training corpus: give "
                          "data.corpus=[DIR, ...]")
    return [len(Corpus(c)) for c in cfg.data.corpus]


def subset_records(sizes: Sequence[int], fraction: float) -> int:
    """Records a run at `fraction` trains on: the pipeline's nested subset of each corpus."""
    from alm_jax.data.pipeline import PipelineConfig, nested_subset_indices
    seed = PipelineConfig(batch_size=1, seq_len=1).subset_seed
    if fraction >= 1.0:
        return int(sum(sizes))
    return int(sum(len(nested_subset_indices(n, fraction, seed + i)) for i, n in enumerate(sizes)))


def _yaml_str(value: str) -> str:
    return json.dumps(str(value))   # a JSON string is YAML: paths with ':' or '#' stay strings


def plan_points(cfg: TrainConfig, fractions: Sequence[float], budget: Budget, out: str | Path, *,
                sizes: Sequence[int] | None = None, schedule: str = "per-point") -> list[Point]:
    """One Point per fraction: its records, steps and the overrides that make its run."""
    sizes = corpus_sizes(cfg) if sizes is None else list(sizes)
    batch = cfg.data.batch_size
    points, empty = [], []
    for f in fractions:
        records = subset_records(sizes, f)
        if budget.kind == "steps_per_sample":
            steps, epochs = max(1, math.ceil(budget.value * records / batch)), 0
        else:
            steps, epochs = (int(budget.value) * records) // batch, int(budget.value)
            if steps < 1:
                empty.append(f"{f:g} ({records} records x {epochs} epochs < data.batch_size={batch})")
                continue
        directory = Path(out) / "points" / point_name(f)
        ov = [f"data.fraction={f!r}", f"steps={steps}", f"data.epochs={epochs}",
              f"checkpoint.dir={_yaml_str(directory / 'checkpoints')}", f"logging.dir={_yaml_str(directory)}",
              "resume=auto"]
        if schedule == "per-point":
            ov.append(f"optim.total_steps={steps}")
        points.append(Point(f, records, steps, epochs, directory, tuple(ov)))
    if empty:
        raise ConfigError(f"--epochs {int(budget.value)} gives no full batch at fraction(s) {', '.join(empty)}; "
                          "raise --epochs, lower data.batch_size, or drop those fractions")
    return points


# --------------------------------------------------------------------------------------- held-out suite


def held_out_names(cfg: TrainConfig) -> list[str]:
    """The evaluators every point runs: `loss` when `eval.corpus` is set, then the other `eval.evaluators`
    and every `eval.suites` entry."""
    from alm_jax.evaluation import EVALUATORS, check_suites
    ev = cfg.eval
    check_suites(ev)
    names = ["loss"] if ev.corpus else []
    for n in [*ev.evaluators, *(s.name for s in ev.suites)]:
        if n not in EVALUATORS:
            raise ConfigError(f"eval.evaluators: unknown {n!r}; choose from {sorted(EVALUATORS)}")
        if n != "loss" and n not in names:
            names.append(n)
    if not names:
        raise ConfigError("nothing to evaluate the points on: give a held-out corpus (eval.corpus=[DIR]) and/or "
                          "suites (eval.evaluators / eval.suites); `alm demo` writes one under runs/demo/corpus/eval")
    return names


def build_held_out(cfg: TrainConfig, *, batches: int, batch_size: int) -> list:
    from alm_jax.evaluation import EVALUATORS, suite_config
    out = []
    for name in held_out_names(cfg):
        if name == "loss":
            out.append(EVALUATORS["loss"](cfg, cfg.eval.corpus, batches=batches, batch_size=batch_size))
        else:
            out.append(EVALUATORS[name].build(cfg, suite_config(cfg.eval, name)))
    return out


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------ file state


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None   # a torn write: treated as absent (the step it records is redone)


def _write(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _finished_steps(ckpt_dir: Path) -> list[int]:
    from alm_jax.training.checkpoint import step_entries
    return [s for s, _, kind in step_entries(ckpt_dir) if kind == "finished"]


def _train_key(cfg_dict: Mapping) -> dict:
    """The settings that make a point's run what it is (the resume-free ones left out, steps kept)."""
    flat = flatten_config(dict(cfg_dict))
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in _FREE)}


def _differences(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]


# ------------------------------------------------------------------------------------------- the study


@dataclasses.dataclass
class Study:
    config: str
    overrides: tuple[str, ...]
    fractions: tuple[float, ...]
    budget: Budget
    out: Path
    launch: str | None = None
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    schedule: str = "per-point"
    fixed: dict | None = None          # power-law parameters held fixed (None: by the number of points)
    metrics: tuple[str, ...] = ()      # fitted and drawn (default: every metric)
    plot: bool = True

    def base_config(self) -> TrainConfig:
        cfg = load_config(self.config, list(self.overrides))
        if self.eval_batches is not None and self.eval_batches < 0:
            raise ConfigError(f"--eval-batches {self.eval_batches}: must be >= 0 (0 = the held-out corpus once)")
        return cfg

    def eval_settings(self, cfg: TrainConfig) -> dict:
        batches = cfg.eval.batches if self.eval_batches is None else self.eval_batches
        ev = {k: v for k, v in to_dict(cfg.eval).items() if k != "every"}   # every: the runs' periodic evals
        # data_fraction: the held-out pipeline would otherwise subset eval.corpus by the point's data.fraction
        return {"names": held_out_names(cfg), "batches": batches,
                "batch_size": self.eval_batch_size or cfg.data.batch_size, "data_fraction": 1.0, "eval": ev}

    def point_config(self, point: Point) -> TrainConfig:
        return load_config(self.config, [*self.overrides, *point.overrides])

    # ---- one point

    def _check_plan(self, point: Point, cfg_dict: dict) -> None:
        old = _read(point.directory / PLAN)
        if old is None:
            return
        diff = _differences(_train_key(old["config"]), _train_key(cfg_dict))
        if diff:
            raise ConfigError(f"point {point.name} in {self.out} was planned with another config or budget ("
                              + "; ".join(diff[:6]) + (f"; {len(diff) - 6} more" if len(diff) > 6 else "")
                              + f"). Use another --out, or delete {point.directory} to train it again")

    def run_point(self, point: Point) -> tuple[str, dict | None]:
        """Trains (or resumes) one point unless it is finished: ("skipped", its point.json), ("trained", None)
        (to evaluate: `evaluate_point`), or ("preempted", None)."""
        cfg = self.point_config(point)
        cfg_dict = to_dict(cfg)
        self._check_plan(point, cfg_dict)
        evs = self.eval_settings(cfg)
        plan = {"fraction": point.fraction, "records": point.records, "steps": point.steps,
                "epochs": point.epochs, "budget": self.budget.describe(), "config_file": str(self.config),
                "overrides": [*self.overrides, *point.overrides], "config": cfg_dict, "eval_settings": evs}
        done = _read(point.directory / POINT)
        trained = _read(point.directory / TRAIN)
        finished = _finished_steps(point.checkpoint_dir)
        if done and trained and trained.get("finished") and done.get("step") in finished:
            if done.get("eval_settings") == evs:
                _say(f"{point.name}: skipped (finished: step {done['step']} in {point.checkpoint_dir}, "
                     f"{point.name}/{POINT})")
                return "skipped", done
            _say(f"{point.name}: the held-out suite changed since it was evaluated: evaluating it again")
        _write(point.directory / PLAN, plan)
        if not (trained and trained.get("finished") and trained.get("step") in finished):
            state = self._train(point, cfg, trained, finished)
            if state != "finished":
                return state, None
        return "trained", None

    def _train(self, point: Point, cfg: TrainConfig, previous: dict | None, finished: list[int]) -> str:
        before = max(finished, default=None)
        _say(f"{point.name}: training {point.records} records for {point.steps} steps "
             f"({self.budget.describe()})" + (f", resuming from step {before}" if before else ""))
        t0 = time.perf_counter()
        if self.launch:
            cmd = [*shlex.split(self.launch), str(self.config), *self.overrides, *point.overrides]
            _say(f"{point.name}: {shlex.join(cmd)}")
            rc = subprocess.run(cmd).returncode
            stopped_by = {0: "done", EXIT_PREEMPTED: "preempted"}.get(rc)
            if stopped_by is None:
                raise AlmError(f"point {point.name}: the launch command exited {rc} (see its output above); "
                               f"rerun `alm scale` to resume it from {point.checkpoint_dir}")
        else:
            from alm_jax.evaluation import build_evaluators
            from alm_jax.training.trainer import train
            from alm_jax.weights.demo_models import resolve_demo_paths
            resolved = resolve_demo_paths(cfg)
            stopped_by = train(resolved, evaluators=build_evaluators(resolved)).stopped_by
        earlier = previous.get("train_seconds", 0.0) if previous and not previous.get("finished") else 0.0
        seconds = time.perf_counter() - t0 + float(earlier)   # a resumed point: the attempts added up
        finished = _finished_steps(point.checkpoint_dir)
        step = max(finished, default=0)
        if stopped_by == "done" and step < point.steps:
            stopped_by = "data_exhausted" if point.epochs else f"stopped at step {step} of {point.steps}"
        ok = stopped_by in ("done", "data_exhausted") and step > 0
        _write(point.directory / TRAIN, {"step": step, "planned_steps": point.steps, "stopped_by": stopped_by,
                                         "finished": ok, "train_seconds": seconds, "resumed_from": before,
                                         "launch": self.launch})
        if stopped_by == "preempted":
            _say(f"{point.name}: preempted at step {step} (checkpointed); rerun the same `alm scale` to continue")
            return "preempted"
        if not ok:
            raise CheckpointError(f"point {point.name}: training ended ({stopped_by}) without a final checkpoint "
                                  f"in {point.checkpoint_dir}")
        _say(f"{point.name}: trained to step {step} in {seconds:.1f} s ({stopped_by})")
        return "finished"

    # ---- all of it

    def run(self) -> int:
        base = self.base_config()
        held_out_names(base)   # refuse a config without held-out data before any training
        points = plan_points(base, self.fractions, self.budget, self.out, schedule=self.schedule)
        self.out.mkdir(parents=True, exist_ok=True)
        _say(f"{len(points)} points ({self.budget.describe()}, batch {base.data.batch_size}): "
             + ", ".join(f"{p.name} {p.records} records / {p.steps} steps" for p in points))
        rows, code, unevaluated = [], 0, []
        for p in points:
            state, result = self.run_point(p)
            if state == "skipped":
                rows.append(result)
            elif state == "trained" and self.launch:
                unevaluated.append(p)   # after the last launch: this process never holds the accelerator
            elif state == "trained":   # while training runs, evaluate as each point finishes
                rows.append(evaluate_point(p.directory))
            else:
                code = EXIT_PREEMPTED
                break
        rows += [evaluate_point(p.directory) for p in unevaluated]
        report(rows, self.out, fixed=self.fixed, metrics=self.metrics, plot=self.plot,
               title=f"alm scale: {Path(self.config).name}, {self.budget.describe()}")
        return code


def evaluate_point(directory: str | Path) -> dict:
    """Evaluates a trained point (its `train.json` step) on the study's held-out suite; writes `point.json`."""
    from alm_jax.export.source import load_run
    directory = Path(directory)
    plan, trained = _read(directory / PLAN), _read(directory / TRAIN)
    if plan is None or trained is None or not trained.get("finished"):
        raise ConfigError(f"{directory} is not a trained `alm scale` point (no {PLAN} / finished {TRAIN})")
    evs = plan["eval_settings"]
    # the whole held-out suite for every point: the data pipeline applies data.fraction to every corpus it
    # reads, eval.corpus included, so the point's fraction must not reach the evaluators
    run = load_run(directory / "checkpoints", trained["step"], overrides=[f"data.fraction={evs['data_fraction']}"])
    cfg = run.cfg
    _say(f"{directory.name}: evaluating step {trained['step']} on {', '.join(evs['names'])}")
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for ev in build_held_out(cfg, batches=evs["batches"], batch_size=evs["batch_size"]):
        metrics.update(_numbers(ev.run(run.model)))
    result = {"fraction": plan["fraction"], "records": plan["records"], "step": trained["step"],
              "planned_steps": plan["steps"], "epochs": plan["epochs"], "budget": plan["budget"],
              "train_seconds": trained["train_seconds"], "stopped_by": trained["stopped_by"],
              "eval_seconds": time.perf_counter() - t0, "metrics": metrics, "eval_settings": evs}
    _write(directory / POINT, result)
    _say(f"{directory.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return result


# ---------------------------------------------------------------------------------------------- report


def _metric_names(rows: Sequence[Mapping]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r.get("metrics", {}):
            if k not in names:
                names.append(k)
    return names


def table(rows: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    """Header and rows: fraction, records, steps, train_seconds, then each metric."""
    metrics = _metric_names(rows)
    header = ["fraction", "records", "steps", "train_seconds", *metrics]
    body = [[r["fraction"], r["records"], r["step"], round(float(r["train_seconds"]), 2),
             *[r["metrics"].get(m, "") for m in metrics]] for r in sorted(rows, key=lambda r: r["fraction"])]
    return header, body


def _markdown(header: list[str], body: list[list], fits: Mapping[str, Mapping]) -> str:
    from alm_jax.scaling.fit import describe

    def cell(column: str, v) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:g}" if column == "fraction" else f"{v:.1f}" if column == "train_seconds" else f"{v:.4f}"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(h, v) for h, v in zip(header, row)) + " |" for row in body]
    lines += ["", "Fit, metric(n) = a + b * n^(-c) over training records n (standard errors in parentheses):", ""]
    for m, fit in fits.items():
        lines.append(f"- {describe(fit, m)}" + (f" ({fit['note']})" if fit.get("note") and fit.get("status") == "ok"
                                                 else ""))
    return "\n".join(lines) + "\n"


def report(rows: Sequence[Mapping], out: str | Path, *, fixed: Mapping[str, float] | None = None,
           metrics: Sequence[str] = (), plot: bool = True, title: str = "") -> dict:
    """Writes scale.csv, scale.md, fit.json and scale.png for the evaluated points `rows`."""
    from alm_jax.scaling.fit import MODEL, describe, fit_power_law
    out = Path(out)
    header, body = table(rows)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    (out / "scale.csv").write_text(buf.getvalue())
    names = list(metrics) or _metric_names(rows)
    missing = [m for m in names if m not in _metric_names(rows)]
    if missing and rows:
        raise ConfigError(f"--metrics {missing}: not among the points' metrics {_metric_names(rows)}")
    fits = {}
    ordered = sorted(rows, key=lambda r: r["fraction"])
    for m in names:
        pts = [(r["records"], r["metrics"][m]) for r in ordered if m in r["metrics"]]
        fits[m] = fit_power_law([p[0] for p in pts], [p[1] for p in pts], fixed=fixed)
        fits[m]["data"] = {"records": [p[0] for p in pts], "values": [p[1] for p in pts]}
        _say(describe(fits[m], m) + (f" [{fits[m]['note']}]" if fits[m].get("note") else ""))
    (out / "scale.md").write_text(_markdown(header, body, fits))
    _write(out / "fit.json", {"model": MODEL, "x": "records (training records of the point's subset)",
                              "points": len(rows), "fits": fits})
    if plot and rows:
        from alm_jax.scaling.plot import plot_study
        drawn = names[:MAX_PANELS]
        if len(names) > MAX_PANELS:
            _say(f"scale.png shows the first {MAX_PANELS} metrics of {len(names)} (--metrics chooses)")
        plot_study(ordered, fits, drawn, out / "scale.png", title=title)
    _say(f"results: {out / 'scale.csv'}, {out / 'scale.md'}, {out / 'fit.json'}"
         + (f", {out / 'scale.png'}" if plot and rows else ""))
    return fits


# ------------------------------------------------------------------------------------------------- CLI


def _parse_fixed(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("a", "b", "c") or not v:
            raise ConfigError(f"--fix {text!r}: expected NAME=VALUE[,...] with NAME in a, b, c (e.g. --fix a=0)")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ConfigError(f"--fix {text!r}: {v!r} is not a number") from None
    return out


def _cmd_scale(args) -> int:
    study = Study(config=args.config, overrides=tuple(args.overrides), fractions=tuple(parse_fractions(args.fractions)),
                  budget=parse_budget(args.budget, args.epochs), out=Path(args.out), launch=args.launch,
                  eval_batches=args.eval_batches, eval_batch_size=args.eval_batch_size, schedule=args.schedule,
                  fixed=_parse_fixed(args.fix), metrics=tuple(m for m in (args.metrics or "").split(",") if m),
                  plot=not args.no_plot)
    return study.run()


def add_parser(sub) -> None:
    """`alm scale` (alm_jax/cli.py::build_parser calls this)."""
    import argparse
    s = sub.add_parser("scale", help="data-size study: train on nested subsets of data.corpus, evaluate each on "
                       "the held-out suite, fit a + b * n^(-c), write a table and a figure",
                       description=__doc__.split("\n\n", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit status: 0 done; 75 a point was preempted (rerun the same command to continue); "
                       "1 failed. Rerunning skips finished points.")
    s.add_argument("--config", required=True, help="YAML config of one run (see configs/)")
    s.add_argument("overrides", nargs="*", help="dotted overrides for every point, e.g. eval.corpus=[DIR] optim.lr=3e-4")
    s.add_argument("--fractions", required=True, help="comma-separated fractions of data.corpus, e.g. "
                   "0.01,0.03,0.1,0.3,1.0 (nested subsets)")
    s.add_argument("--out", required=True, help="study directory (points/, scale.csv, scale.md, fit.json, scale.png)")
    s.add_argument("--budget", default=None, help="steps-per-sample=K: steps = ceil(K * records / data.batch_size)")
    s.add_argument("--epochs", type=int, default=None, help="E passes over each subset (data.epochs=E)")
    s.add_argument("--launch", default=None, metavar="'SCRIPT ARGS'", help="train each point with `SCRIPT ARGS "
                   "CONFIG OVERRIDE...` (the arguments of `alm train`), e.g. 'launch/local_multihost.sh 2'")
    s.add_argument("--eval-batches", type=int, default=None, help="held-out loss batches (default eval.batches; "
                   "0 = the held-out corpus once)")
    s.add_argument("--eval-batch-size", type=int, default=None, help="held-out loss batch (default data.batch_size)")
    s.add_argument("--schedule", default="per-point", choices=["per-point", "config"],
                   help="per-point: optim.total_steps = the point's steps (default); config: as configured")
    s.add_argument("--fix", default=None, metavar="a=0", help="hold power-law parameters fixed (default: all free "
                   "with >= 4 points, a=0 with 2-3)")
    s.add_argument("--metrics", default=None, help="comma-separated metrics to fit and draw (default: all)")
    s.add_argument("--no-plot", action="store_true", help="skip scale.png")
    s.set_defaults(func=_cmd_scale)
