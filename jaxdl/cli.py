"""The `jaxdl` command: train, sweep, evaluate, generate, chat, import, export(-hf/-gguf), predict,
demo.

User errors (`jaxdl.errors.UserError`: bad flags, unknown config keys, bad files,
mismatched checkpoints) print one line naming what was expected and what was found, and
exit with status 2; ``--debug`` shows the traceback instead. Any other exception is a bug:
the full traceback goes to stderr, then a one-line summary, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from jaxdl.errors import Stopped, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str, status: int = 2) -> int:
    print(f"jaxdl: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train (or resume) a run in --workdir")
    train.add_argument("--config", required=True, help="experiments/NAME.py")
    train.add_argument("--workdir", required=True)
    train.add_argument("--folds", type=int, default=0, help="k-fold cross-validation")
    train.add_argument("--no-progress", action="store_true")
    cluster = train.add_argument_group("multi-process (one process per host; see README)")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    cluster.add_argument("--num-processes", type=int, metavar="N")
    cluster.add_argument("--process-id", type=int, metavar="I", help="0..N-1")
    train.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sweep = sub.add_parser("sweep", help="many trials of a config, M at a time in one vmapped step")
    sweep.add_argument("--config", required=True, help="experiments/NAME.py")
    sweep.add_argument("--workdir", required=True)
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=SPACE",
        help="[v1,v2,...], choice(...), uniform(a,b), loguniform(a,b), int(a,b); repeatable",
    )
    sweep.add_argument("--trials", type=int, default=None, help="default: the grid, or 16")
    sweep.add_argument("--parallel", type=int, default=8, help="members per vmapped group")
    sweep.add_argument("--strategy", choices=["grid", "random", "tpe"], default=None)
    sweep.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB URL: sqlite:///DIR/sweep.db, postgresql://USER@HOST:PORT/DB",
    )
    sweep.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    evaluate = sub.add_parser("evaluate", help="evaluate a trained workdir")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument(
        "--split", default=None, help="default: test, or val when the source holds none out"
    )
    evaluate.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    gen = sub.add_parser("generate", help="continue a prompt with a trained language model")
    gen.add_argument("--workdir", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="the README's main job, on bundled data")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--task", choices=["lm", "digits", "chat"], default="lm")
    demo.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    export = sub.add_parser("export", help="serialize a trained workdir with jax.export")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="MODEL.jaxexport (+ MODEL.jaxexport.json)")
    export.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        help="cpu, cuda, rocm, tpu; repeat for several (default: cpu)",
    )
    export.add_argument("--quantize", choices=["int8"], default=None)
    export.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    predict = sub.add_parser("predict", help="run an exported model on image (or text) files")
    predict.add_argument("model", help="MODEL.jaxexport")
    predict.add_argument("inputs", nargs="+", metavar="INPUT")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--max-new-tokens", type=int, default=64, help="language models")
    predict.add_argument("--json", action="store_true", help="print the results as JSON")
    predict.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    imp = sub.add_parser("import", help="import pretrained weights as a workdir at step 0")
    imp.add_argument("kind", metavar="KIND", help="e.g. hf:gpt2")
    imp.add_argument("--from", dest="source", required=True, help="local path or hub name")
    imp.add_argument("--out", required=True, help="the new workdir")
    imp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    export_hf = sub.add_parser(
        "export-hf", help="write a GPT-2 or Llama-family workdir in transformers' format"
    )
    export_hf.add_argument("--workdir", required=True)
    export_hf.add_argument("--out", required=True, help="folder for from_pretrained")
    parts = export_hf.add_mutually_exclusive_group()
    parts.add_argument(
        "--adapter", action="store_true", help="the LoRA adapters alone, as a PEFT folder"
    )
    parts.add_argument(
        "--base",
        action="store_true",
        help="a LoRA run's base without its adapters (a QLoRA run's: dequantized), the "
        "model its --adapter export goes on",
    )
    export_hf.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    export_gguf = sub.add_parser(
        "export-gguf", help="write a Llama-family workdir as a GGUF (llama.cpp, Ollama)"
    )
    export_gguf.add_argument("--workdir", required=True)
    export_gguf.add_argument("--out", required=True, help="the .gguf file")
    export_gguf.add_argument("--type", default="f16", choices=["f16", "q8_0"])
    export_gguf.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    chat = sub.add_parser("chat", help="chat with a model (its chat template); stdout: the reply")
    chat.add_argument("--workdir", required=True)
    chat.add_argument("--prompt", default=None, help="answer once and exit")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate '--config.KEY=VALUE' overrides from the other arguments."""
    overrides, rest = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else rest).append(arg)
    return overrides, rest


# Path arguments (attribute -> flag): an empty one would silently mean the current folder.
_PATHS = {"workdir": "--workdir", "out": "--out", "config": "--config", "source": "--from"}


def _empty_path(args: argparse.Namespace) -> str | None:
    """The one-line refusal of an empty path argument, or None."""
    for attr, flag in _PATHS.items():
        value = getattr(args, attr, None)
        if value is not None and not value.strip():
            return (
                f"{flag}: expected a path, found {value!r} (it would mean the current "
                f"folder). Fix: name one, e.g. {flag} runs/NAME."
            )
    for value in [getattr(args, "model", None), *getattr(args, "inputs", [])]:
        if value is not None and not value.strip():
            return f"{args.command}: expected file paths, found {value!r}. Fix: name the files."
    return None


def run(argv: Sequence[str]) -> int:
    overrides, rest = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if (empty := _empty_path(args)) is not None:
        return _fail(empty)
    if overrides and args.command not in ("train", "sweep"):
        return _fail(f"--config.KEY=VALUE overrides apply to `jaxdl train`, not {args.command}.")
    if args.command == "train":
        from jaxdl.parallel.sharding import initialize_distributed

        # Before anything touches a device; a no-op without flags outside SLURM / Open MPI.
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        from jaxdl import config as config_lib

        # A bad config is reported before the trainer's imports (sklearn and more: ~2 s).
        cfg = config_lib.load_config(args.config, overrides)
        from jaxdl.training.trainer import train

        if cfg.tasks:
            from jaxdl.training.multitask import run_tasks

            summary = run_tasks(cfg, args.workdir, progress=not args.no_progress)
        elif cfg.federated.clients:
            from jaxdl.runs.federated import run_federated

            summary = run_federated(cfg, args.workdir)
        elif args.folds:
            from jaxdl.training.crossval import cross_validate

            summary = cross_validate(
                cfg, args.workdir, folds=args.folds, progress=not args.no_progress
            )
        else:
            summary = train(cfg, args.workdir, progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
    elif args.command == "sweep":
        from jaxdl import config as config_lib

        cfg = config_lib.load_config(args.config, overrides)  # as for train: first
        from jaxdl.runs.sweep import run_sweep

        run_sweep(
            cfg,
            args.workdir,
            args.param,
            trials=args.trials,
            parallel=args.parallel,
            strategy=args.strategy,
            storage=args.storage,
        )
    elif args.command == "evaluate":
        from jaxdl.training.evaluate import evaluate_workdir

        print(json.dumps(evaluate_workdir(args.workdir, args.split), indent=2))
    elif args.command == "generate":
        from jaxdl.lm.generate import generate_text

        print(
            generate_text(
                args.workdir,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                greedy=args.greedy,
                seed=args.seed,
            )
        )
    elif args.command == "demo":
        from jaxdl.training.demo import run_demo

        run_demo(args.workdir, task=args.task)
    elif args.command == "export":
        from jaxdl.training.evaluate import export_workdir

        meta = export_workdir(
            args.workdir, args.out, platforms=args.platforms or ["cpu"], quantize=args.quantize
        )
        print(
            f"wrote {args.out} ({meta['artifact_bytes']:,} bytes, platforms "
            f"{','.join(meta['platforms'])}) and {args.out}.json"
        )
    elif args.command == "predict":
        from jaxdl.deploy.predict import format_predictions, predict_files

        results = predict_files(
            args.model, args.inputs, top_k=args.top_k, max_new_tokens=args.max_new_tokens
        )
        print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    elif args.command == "import":
        from jaxdl.interop import import_checkpoint

        report = import_checkpoint(args.kind, args.source, args.out)
        files = ", ".join(f["name"] for f in report["source"]["files"])
        missing = report["source"].get("missing_pieces") or []
        note = f"; MISSING: {', '.join(missing)}" if missing else ""
        if "tokenizer" in missing:
            note += " (weights-only: generate, chat and text data will refuse)"
        print(
            f"imported {args.kind} from {files}: {len(report['loaded'])} leaves loaded, "
            f"{len(report['ignored'])} source keys ignored, {len(report['dtype_cast'])} cast"
            f"{note}; workdir {args.out} (see import_report.json)"
        )
    elif args.command == "export-hf":
        from jaxdl.interop.hf_export import export_hf
        from jaxdl.interop.peft import export_adapter

        if args.adapter:
            result = export_adapter(args.workdir, args.out)
        else:
            result = export_hf(args.workdir, args.out, base=args.base)
        note = f"; {result['note']}" if result.get("note") else ""
        print(f"wrote {args.out}: {', '.join(result['files'])} ({result['params']:,} params){note}")
    elif args.command == "export-gguf":
        from jaxdl.interop.gguf import export_gguf

        result = export_gguf(args.workdir, args.out, args.type)
        print(
            f"wrote {args.out} ({result['architecture']}, {result['type']}, "
            f"{result['bytes']:,} bytes)"
        )
    elif args.command == "chat":
        from jaxdl.lm.chat import run_chat

        run_chat(
            args.workdir,
            prompt=args.prompt,
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return run(argv)
    except UserError as err:
        if debug:
            raise
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Stopped as stop:
        print(f"jaxdl: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)
    except Exception as err:  # a bug, not bad input: keep the whole traceback
        from jaxdl.fileio import disk_error, quiet_disk_echoes

        disk = disk_error(err)  # unless the disk refused: full, read-only, no permission
        if disk is not None and not debug:
            quiet_disk_echoes()
            return _fail(str(disk))
        traceback.print_exc()
        summary = str(err).splitlines()[0] if str(err) else ""
        print(
            f"jaxdl: internal error (a bug, not your input): {type(err).__name__}: {summary}. "
            "The traceback is above; please report it.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
