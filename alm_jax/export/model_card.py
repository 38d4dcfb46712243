"""A Hugging Face model card (README.md with YAML metadata) for an exported run: what the model is, the recipe
and data it was trained on (from the corpus manifests), the training settings, and the run's latest evaluation
numbers (from its metrics JSONL: the last logged value of every `eval/...` key)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from alm_jax.export.source import TrainedRun


def corpus_stats(corpora) -> dict[str, Any]:
    """Records, audio hours and records per recipe / source over the corpus manifests that exist."""
    stats: dict[str, Any] = {"records": 0, "audio_hours": 0.0, "per_recipe": Counter(), "per_source": Counter(),
                             "corpora": []}
    for c in corpora:
        manifest = Path(c) / "manifest.json"
        if not manifest.is_file():
            continue
        m = json.loads(manifest.read_text())
        stats["corpora"].append(str(c))
        stats["records"] += int(m.get("total_records", 0))
        stats["audio_hours"] += float(m.get("audio_hours", 0.0))
        stats["per_recipe"].update(m.get("per_recipe", {}))
        stats["per_source"].update(m.get("per_source", {}))
    return stats


def latest_evals(metrics_file: Path) -> tuple[dict[str, float], int | None]:
    """The last logged value of each `eval/...` metric in the run's metrics JSONL, and the last step with one."""
    out: dict[str, float] = {}
    last_step = None
    if not metrics_file.is_file():
        return out, None
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        evals = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))
                 and math.isfinite(v)}
        if evals:
            out.update(evals)
            last_step = row.get("step", last_step)
    return out, last_step


def model_card(run: TrainedRun, *, fmt: str) -> str:
    cfg = run.cfg
    m = cfg.model
    stats = corpus_stats(cfg.data.corpus)
    evals, eval_step = latest_evals(Path(cfg.logging.dir) / "metrics.jsonl")
    recipes = ", ".join(f"{k} ({v})" for k, v in sorted(stats["per_recipe"].items())) or "unknown"
    encoders = "; ".join(f"{e.kind} `{Path(e.path).name}` (taps {list(e.taps)}, {e.tap_indexing})" for e in m.encoders)
    lora = f"rank {m.lora.rank}, alpha {m.lora.alpha}, target `{m.lora.target}`" if m.lora.rank else "none"
    front = ["---", "library_name: alm_jax", "tags:", "- audio-language-model", "- audio-text-to-text",
             f"- {m.connector.kind}", f"base_model: {Path(m.llm).name}", "pipeline_tag: audio-text-to-text", "---", ""]
    lines = [f"# {Path(cfg.logging.dir).name or 'alm'} — audio-language model ({fmt} export)", "",
             f"Frozen audio encoder(s) + a trained `{m.connector.kind}` connector"
             + (" + LoRA" if m.lora.rank else "") + f" + the frozen LLM `{Path(m.llm).name}`, trained with "
             "alm_jax on targets the backbone LLM wrote from text metadata of the audio (self-generated alignment).",
             "", "## Model", "",
             f"- LLM: `{m.llm}`", f"- Encoders: {encoders}",
             f"- Connector: `{m.connector.kind}` (queries {m.connector.num_queries}, layers {m.connector.num_layers})",
             f"- LoRA: {lora}", f"- Compute dtype: {m.dtype}", "",
             "## Training data", "",
             f"- Recipes: {recipes}", f"- Records: {stats['records']} ({stats['audio_hours']:.2f} h of audio)",
             f"- Sources: {', '.join(f'{k} ({v})' for k, v in sorted(stats['per_source'].items())) or 'unknown'}",
             f"- Corpora: {', '.join(f'`{c}`' for c in stats['corpora']) or 'not found on this machine'}", "",
             "## Training", "",
             f"- Step exported: {run.step} of {cfg.steps}", f"- Global batch: {cfg.data.batch_size}, "
             f"max text tokens {cfg.data.max_text_tokens}, max clips {cfg.data.max_clips}",
             f"- Optimizer: AdamW lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}, {cfg.optim.total_steps} "
             f"total steps), weight decay {cfg.optim.weight_decay:g}, clip {cfg.optim.clip_norm:g}",
             f"- Seed: {cfg.seed}", "", "## Evaluation", ""]
    if evals:
        lines += [f"Latest values logged by the run (step {eval_step}):", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(evals.items())]
    else:
        lines.append("No evaluation was logged by this run.")
    use = ("alm import THIS_DIR --out CKPT_DIR    # the JAX model again, as a checkpoint `alm eval` reads"
           if fmt == "bundle" else "# transformers loads this directory with from_pretrained")
    lines += ["", "## Use", "", "```bash", use, "```", ""]
    return "\n".join(front + lines)
