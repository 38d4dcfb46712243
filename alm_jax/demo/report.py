"""The demo's report: numbers from the run's files -> `report.json`, `report.md`, `report.html` and PNG plots.

    numbers = collect(run_dir)            # reads [naming/]train/metrics.jsonl, eval/*.json and their details
    write_report(run_dir, numbers)        # report.json / .md / .html, loss.png, accuracy.png

Inputs (what the chain's commands wrote under `run_dir`): `naming/train/metrics.jsonl` and `train/metrics.jsonl`
(`alm train` of stage 1 and stage 2: loss per logged step, periodic `eval/...` rows; stage 2's steps are counted on
from stage 1's last, so the curves run across both), `eval/<suite>.json` and `eval/<suite>-details/*.json` (`alm eval
--out`), `corpus/<recipe>/generation_report.json` (`alm generate`), `timings.json` (the chain's step
times). `report.json` holds the flat keys the README quotes (`hallucination.accuracy`, `hallucination.no_f1`,
`hallucination.backbone_text_accuracy`, `hallucination.no_audio_accuracy`, `multi_audio.accuracy`,
`forgetting.exact_match`, `alignment.agreement`, `alignment.baseline`, `train.steps`, `train.seconds`,
`total_seconds`) and more (confidence intervals, the corpus counts, and the last periodic held-out loss with
each clip's own audio and with another clip's: `train.listening_gap`, ~0 for a model that does not listen).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from alm_jax.demo import NAMING, STAGES   # the training stages: their log dirs, labels, chain steps

SUITES = ("hallucination", "multi_audio", "forgetting", "alignment")
# report key -> (suite, metric name in the suite's results)
KEYS = {
    "hallucination.accuracy": ("hallucination", "accuracy"),
    "hallucination.no_f1": ("hallucination", "f1_no"),
    "hallucination.yes_rate": ("hallucination", "yes_rate"),
    "hallucination.speech_accuracy": ("hallucination", "speech_accuracy"),
    "hallucination.events_accuracy": ("hallucination", "events_accuracy"),
    "hallucination.backbone_text_accuracy": ("hallucination", "backbone_text_accuracy"),
    "hallucination.no_audio_accuracy": ("hallucination", "no_audio_accuracy"),
    "hallucination.questions": ("hallucination", "questions"),
    "multi_audio.accuracy": ("multi_audio", "accuracy"),
    "multi_audio.accuracy_backbone_text": ("multi_audio", "accuracy_backbone_text"),
    "multi_audio.accuracy_no_audio": ("multi_audio", "accuracy_no_audio"),
    "multi_audio.items": ("multi_audio", "items"),
    "forgetting.exact_match": ("forgetting", "exact_match"),
    "alignment.agreement": ("alignment", "agreement"),
    "alignment.baseline": ("alignment", "baseline"),
    "alignment.ratio": ("alignment", "ratio"),
    "alignment.accuracy": ("alignment", "accuracy"),
    "alignment.accuracy_backbone_text": ("alignment", "accuracy_backbone_text"),
    "alignment.accuracy_no_audio": ("alignment", "accuracy_no_audio"),
    "alignment.readable_backbone": ("alignment", "readable_backbone"),
    "alignment.items": ("alignment", "items"),
    "alignment.constant_baseline": ("alignment", "constant_baseline"),
    "alignment.distinct_alm": ("alignment", "distinct_alm"),
}
CURVES = (("eval/hallucination/accuracy", "hallucination accuracy"),
          ("eval/alignment/agreement", "alignment agreement"),
          ("eval/alignment/baseline", "alignment no-audio baseline"))


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (percent) of a proportion `successes / n`."""
    if n <= 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * (centre - half), 100.0 * (centre + half)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _suite_metrics(run_dir: Path, suite: str) -> dict[str, float]:
    """A suite's metrics (`alm eval --out` rows: {checkpoint: {"step", "eval/<suite>/<m>": v}}) without prefixes."""
    rows = _read_json(run_dir / "eval" / f"{suite}.json") or {}
    row = next(iter(rows.values()), {})
    return {k.rsplit("/", 1)[-1] if k.startswith(f"eval/{suite}/") else k: v for k, v in row.items()}


def _details(run_dir: Path, suite: str) -> dict[str, Any]:
    found = sorted((run_dir / "eval" / f"{suite}-details").glob("*.json"))
    return json.loads(found[0].read_text()) if found else {}


def training_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metric rows of every stage's `metrics.jsonl` (event rows left out; [] before training), each with its
    `stage` and its `step` counted across the stages (stage 2's step s -> s + stage 1's last step)."""
    from alm_jax.training.metrics import METRICS_FILE, read_metrics
    rows: list[dict[str, Any]] = []
    offset = 0
    for stage in STAGES:
        logs = stage.log_dir(run_dir)
        if not (logs / METRICS_FILE).exists():
            continue
        own = [{**r, "step": r["step"] + offset, "stage": stage.label} for r in read_metrics(logs)
               if "event" not in r and "step" in r]
        rows += own
        offset = max((r["step"] for r in own), default=offset)
    return rows


def stage_starts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(stage, the step before its first row) for every stage after the first: where the plots mark a new stage."""
    starts, seen = [], None
    for i, r in enumerate(rows):
        if r["stage"] != seen:
            if seen is not None:
                starts.append((r["stage"], max(x["step"] for x in rows[:i])))
            seen = r["stage"]
    return starts


def count_clips(corpus_dir: Path) -> int | None:
    """Audio clips in a corpus's records (None when it cannot be read)."""
    from alm_jax.data.corpus import Corpus
    try:
        return sum(len(r.clips) for r in Corpus(corpus_dir))
    except Exception:   # noqa: BLE001 - a report of a partial or foreign directory still gets written
        return None


def collect(run_dir) -> dict[str, Any]:
    """Every number of the report, from the files of a finished chain (missing parts are left out)."""
    run_dir = Path(run_dir)
    metrics = {s: _suite_metrics(run_dir, s) for s in SUITES}
    out: dict[str, Any] = {}
    for key, (suite, name) in KEYS.items():
        if name in metrics[suite]:
            out[key] = metrics[suite][name]
    ma = metrics["multi_audio"]
    if "accuracy" in ma and ma.get("items"):
        lo, hi = wilson(ma["accuracy"] / 100 * ma["items"], ma["items"])
        out["multi_audio.ci95"] = [lo, hi]
        out["multi_audio.chance"] = 50.0
        out["multi_audio.margin"] = ma["accuracy"] - 50.0
    ha = metrics["hallucination"]
    if "accuracy" in ha and ha.get("questions"):
        out["hallucination.ci95"] = list(wilson(ha["accuracy"] / 100 * ha["questions"], ha["questions"]))
    al = metrics["alignment"]
    if "agreement" in al and al.get("items"):
        out["alignment.ci95"] = list(wilson(al["agreement"] / 100 * al["items"], al["items"]))
    rows = training_rows(run_dir)
    timings = _read_json(run_dir / "timings.json") or {}
    steps = [r["step"] for r in rows if "loss" in r]
    if steps:
        out["train.steps"] = max(steps)
    evals = [r for r in rows if r.get("eval/listening_gap") is not None]
    if evals:   # the last periodic held-out loss with the clip's own audio and with the next sample's
        out["train.heldout_loss"] = evals[-1]["eval/loss"]
        out["train.heldout_loss_other_audio"] = evals[-1]["eval/loss_other_audio"]
        out["train.listening_gap"] = evals[-1]["eval/listening_gap"]
    stages = {r["stage"]: r["step"] for r in rows if "loss" in r}
    if NAMING.label in stages:
        out["train.naming_steps"] = stages[NAMING.label]
    trained = [timings[stage.name] for stage in STAGES if stage.name in timings]
    if trained:
        out["train.seconds"] = sum(trained)
    corpus = {}
    for report in sorted((run_dir / "corpus").glob("*/generation_report.json")):
        r = json.loads(report.read_text())
        corpus[report.parent.name] = {"items": r["items"], "records": r["records_kept"], "filtered": r["filtered"],
                                      "clips": count_clips(report.parent)}
    if corpus:
        out["corpus"] = corpus
    if timings:
        out["step_seconds"] = {k: v for k, v in timings.items() if k != "total"}
        out["total_seconds"] = timings.get("total", sum(timings.values()))
    return out


def _plot(path: Path, series: list[tuple[str, list[int], list[float]]], ylabel: str, title: str,
          marks: list[tuple[str, int]] = ()) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [s for s in series if s[1]]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    for stage, step in marks:
        ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"{stage} from here ", (step, 0.5), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                    va="center", fontsize=8, color="grey")   # along the line, clear of the legend
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plots(run_dir) -> list[str]:
    """`loss.png` (training loss, held-out loss) and `accuracy.png` (the periodic suites) in `run_dir`, a dashed
    line where a stage starts; returns the files written."""
    run_dir = Path(run_dir)
    rows = training_rows(run_dir)
    marks = stage_starts(rows)
    written = []
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval/loss"]) for r in rows if r.get("eval/loss") is not None]
    other = [(r["step"], r["eval/loss_other_audio"]) for r in rows if r.get("eval/loss_other_audio") is not None]
    if _plot(run_dir / "loss.png", [("training loss", [s for s, _ in train], [v for _, v in train]),
                                    ("held-out loss", [s for s, _ in held], [v for _, v in held]),
                                    ("held-out loss, another clip's audio", [s for s, _ in other],
                                     [v for _, v in other])],
             "loss (nats / token)", "Loss", marks):
        written.append("loss.png")
    curves = []
    for key, label in CURVES:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        curves.append((label, [s for s, _ in pts], [v for _, v in pts]))
    if _plot(run_dir / "accuracy.png", curves, "percent", "Held-out accuracy during training", marks):
        written.append("accuracy.png")
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.1f}, {v[1]:.1f}]"
    return str(v)


def examples(run_dir, n: int = 6) -> list[dict[str, str]]:
    """Held-out examples: the question, the seed description, the ALM's answer from audio and the backbone's
    from text (alignment items first, then hallucination ones)."""
    run_dir = Path(run_dir)
    rows = []
    for item in _details(run_dir, "alignment").get("items", [])[: n // 2]:
        rows.append({"seed": item["seed"], "question": item["question"], "alm": item["alm"],
                     "backbone_text": item["backbone_text"], "expected": ", ".join(item["labels"])})
    for item in _details(run_dir, "hallucination").get("items", [])[: n - len(rows)]:
        rows.append({"seed": item.get("seed", ""), "question": item["question"], "alm": item["answer"],
                     "backbone_text": item.get("backbone_text", ""), "expected": item["expected"]})
    return rows


def _table(numbers: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, _fmt(v)) for k, v in numbers.items() if not isinstance(v, dict)]


def write_report(run_dir, numbers: dict[str, Any], *, command: str = "make demo") -> list[str]:
    """Writes `report.json`, `report.md`, `report.html` (and the plots) into `run_dir`; returns the files."""
    run_dir = Path(run_dir)
    pictures = plots(run_dir)
    (run_dir / "report.json").write_text(json.dumps(numbers, indent=2))
    ex = examples(run_dir)
    md = ["# alm_jax demo report", "", f"Command: `{command}`", ""]
    md += [f"![{p}]({p})" for p in pictures] + [""]
    md += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in _table(numbers)] + [""]
    if ex:
        md += ["## Held-out answers: the ALM from audio next to the backbone from the text description", ""]
        for e in ex:
            md += [f"- **question**: {e['question']} (expected: {e['expected']})",
                   f"  - seed description: `{' / '.join(e['seed'].splitlines())}`",
                   f"  - ALM from audio: {e['alm']}", f"  - backbone from text: {e['backbone_text']}"]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    esc = html.escape
    body = [f"<h1>alm_jax demo report</h1><p>Command: <code>{esc(command)}</code></p>"]
    body += [f'<img src="{esc(p)}" alt="{esc(p)}">' for p in pictures]
    body += ["<table><tr><th>metric</th><th>value</th></tr>"] + [
        f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _table(numbers)] + ["</table>"]
    if ex:
        body += ["<h2>Held-out answers: the ALM from audio next to the backbone from the text description</h2>",
                 "<table><tr><th>question</th><th>seed description</th><th>ALM from audio</th>"
                 "<th>backbone from text</th></tr>"]
        body += [f"<tr><td>{esc(e['question'])} (expected: {esc(e['expected'])})</td><td><pre>{esc(e['seed'])}</pre>"
                 f"</td><td>{esc(e['alm'])}</td><td>{esc(e['backbone_text'])}</td></tr>" for e in ex] + ["</table>"]
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:4px}" \
            "table{border-collapse:collapse}img{max-width:48%}"
    (run_dir / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>alm_jax demo"
                                         f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return ["report.json", "report.md", "report.html"] + pictures
