"""The `jaxdl` command: train, evaluate, demo.

User errors (bad flags, unknown config keys, bad files, mismatched checkpoints) print one
line naming what was expected and what was found, and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"jaxdl: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train (or resume) a run in --workdir")
    train.add_argument("--config", required=True, help="experiments/NAME.py")
    train.add_argument("--workdir", required=True)
    train.add_argument("--folds", type=int, default=0, help="k-fold cross-validation")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    evaluate = sub.add_parser("evaluate", help="evaluate a trained workdir")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="the README's main job, on bundled data")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--task", choices=["digits"], default="digits")
    demo.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate '--config.KEY=VALUE' overrides from the other arguments."""
    overrides, rest = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else rest).append(arg)
    return overrides, rest


def run(argv: Sequence[str]) -> int:
    overrides, rest = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command != "train":
        return _fail(f"--config.KEY=VALUE overrides apply to `jaxdl train`, not {args.command}.")
    if args.command == "train":
        from jaxdl import config as config_lib
        from jaxdl.trainer import train

        cfg = config_lib.load_config(args.config, overrides)
        if args.folds:
            from jaxdl.crossval import cross_validate

            summary = cross_validate(cfg, args.workdir, folds=args.folds,
                                     progress=not args.no_progress)
        else:
            summary = train(cfg, args.workdir, progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
    elif args.command == "evaluate":
        from jaxdl.evaluate import evaluate_workdir

        print(json.dumps(evaluate_workdir(args.workdir, args.split), indent=2))
    elif args.command == "demo":
        from jaxdl.demo import run_demo

        run_demo(args.workdir, task=args.task)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return run(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
