"""Command-line entry points.

``o1pruner-train``: every stage (sample -> score -> train -> eval) in one resumable run; with no
arguments it runs the small embedded toy demo. ``o1pruner sample|score|train|eval``: one stage.

Exit codes: 0 success; 2 bad input (config, flags, data files: one message on stderr, no traceback);
1 an unexpected error (with its traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields

from o1pruner.config import (
    GROUPS,
    STAGES,
    ConfigError,
    PipelineConfig,
    coerce_value,
    field_types,
    recipe_names,
    resolve_config,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_OUTPUT_DIR = "runs/toy-demo"

TRAIN_DESCRIPTION = """\
Length-Harmonizing Fine-Tuning (O1-Pruner, arXiv 2501.12570) of a long-thought reasoning model on one GPU:
pre-sample K solutions per training problem from the model, score them with the length-harmonizing reward,
train with the off-policy PPO-clip objective, then evaluate the base and the tuned model.

Values come from the defaults, then --recipe, then --config FILE (YAML, keys = the option names with
underscores), then the flags. Everything goes to --output-dir; rerunning the same command skips finished
stages and resumes partial ones. With no arguments at all, runs a small self-contained toy demo on the CPU.
"""
EPILOG = """\
recipes: {recipes}
exit codes: 0 success, 2 bad input (config, flags, data), 1 unexpected error, 130 interrupted.
examples:
  o1pruner-train --recipe r1-distill-qwen-1.5b --output-dir runs/r1-1.5b
  o1pruner-train --model ./my-model --dataset train.jsonl --eval-dataset test.jsonl --k 8 --lam 2
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (plus a close-match hint for a mistyped flag) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("--"):
            flag = match.group(1).split("=")[0]
            close = difflib.get_close_matches(flag, [o for a in self._actions for o in a.option_strings], n=2)
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per PipelineConfig field, grouped by stage; defaults are SUPPRESSed so only given flags count."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of option values (keys: option names).")
    parser.add_argument(
        "--recipe", metavar="NAME", help=f"Packaged recipe to start from: {', '.join(recipe_names())}."
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    types = field_types()
    for f in fields(PipelineConfig):
        meta = f.metadata
        tp = types[f.name]
        optional = type(None) in typing.get_args(tp)
        base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        help_text = meta.get("help", "")
        shown = "none" if default is None else default
        if isinstance(default, list):
            shown = ",".join(default) or "none"
        help_text = f"{help_text} (default: {shown})".replace("%", "%%")
        group = groups[meta.get("group", "run")]
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            group.add_argument(_flag(f.name), metavar="A,B", **kwargs)
            continue
        metavar = {int: "N", float: "X"}.get(base, "STR" if base is str else None)
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
            metavar = None
        if f.name in ("model", "dataset", "eval_dataset", "output_dir"):
            metavar = "PATH" if f.name == "output_dir" else "NAME_OR_PATH"
        # Values stay strings here; PipelineConfig checks them and names the flag in its message.
        group.add_argument(_flag(f.name), metavar=metavar, **kwargs)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return resolve_config(recipe=args.recipe, config_file=args.config, overrides=_overrides(args))


def build_train_parser(prog: str = "o1pruner-train") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(recipes=", ".join(recipe_names())),
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"Run the embedded toy demo (what no arguments at all does); other flags override its settings "
        f"(default run directory: {DEMO_OUTPUT_DIR}).",
    )
    add_config_arguments(parser)
    return parser


STAGE_HELP = {
    "sample": "pre-sample K solutions per training problem (writes samples.jsonl, samples.done.json)",
    "score": "score the samples: rewards and reference log-probs (writes scored.parquet)",
    "train": "off-policy PPO-clip training (writes checkpoints/, metrics.jsonl, model/)",
    "eval": "evaluate the base and the tuned model; write eval.json, metrics.json, report.md, plots",
}


def build_main_parser(prog: str = "o1pruner") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Run one stage of the O1-Pruner pipeline in a run directory (o1pruner-train runs them all).",
        epilog=EPILOG.format(recipes=", ".join(recipe_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="stage", parser_class=ArgumentParser, metavar="{" + ",".join(STAGES) + "}", required=True
    )
    for stage in STAGES:
        sp = sub.add_parser(
            stage,
            help=STAGE_HELP[stage],
            description=STAGE_HELP[stage],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_arguments(sp)
    return parser


def _run_guarded(fn) -> int:
    """Run ``fn``; bad input -> one line on stderr and exit 2, no traceback. Other errors propagate."""
    try:
        fn()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("O1PRUNER_DEBUG"):
            raise
        # DataError and ConfigError are ValueErrors; a ValueError raised deep inside a library is also
        # most often a bad value from the user. Show it as one message.
        from o1pruner.io import DataError

        name = "config error" if isinstance(e, ConfigError) else "error"
        hint = "" if isinstance(e, (ConfigError, DataError)) else " (O1PRUNER_DEBUG=1 shows the traceback)"
        print(f"o1pruner: {name}: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("o1pruner: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def run_toy_demo(args: argparse.Namespace | None = None) -> None:
    """The embedded toy demo (``o1pruner-train`` with no arguments, or ``--demo``).

    ``o1pruner.toy.prepare_toy`` builds (or finds in its cache) a tiny long-thinking model and its problem
    files and returns the pipeline settings pointing at them; the standard pipeline then runs unchanged.
    Flags given with ``--demo`` override the demo's settings.
    """
    from o1pruner.pipeline import Pipeline, _log
    from o1pruner.toy import prepare_toy  # the single call site of the toy package

    user = _overrides(args) if args is not None else {}
    if args is not None and args.recipe:
        raise ConfigError(
            "--demo and --recipe exclude each other (the demo brings its own model and problems)"
        )
    output_dir = str(user.get("output_dir", DEMO_OUTPUT_DIR))
    seed = coerce_value("seed", user.get("seed", 0), "command line")
    _log(f"toy demo: a tiny long-thinking model on running sums, run directory {output_dir}")
    assets = prepare_toy(output_dir, seed, log=_log)
    cfg = resolve_config(
        base=assets.overrides,
        config_file=args.config if args is not None else None,
        overrides={**user, "output_dir": output_dir},
    )
    Pipeline(cfg).run(STAGES)


def _overrides(args: argparse.Namespace) -> dict:
    names = set(PipelineConfig.field_names())
    return {k: v for k, v in vars(args).items() if k in names}


def train_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``o1pruner-train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return _run_guarded(run_toy_demo)
    parser = build_train_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on a malformed flag
    if args.demo:
        return _run_guarded(lambda: run_toy_demo(args))

    def go():
        from o1pruner.pipeline import Pipeline

        Pipeline(config_from_args(args)).run(STAGES)

    return _run_guarded(go)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``o1pruner``: one stage per call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_main_parser()
    args = parser.parse_args(argv)

    def go():
        from o1pruner.pipeline import Pipeline

        Pipeline(config_from_args(args)).run([args.stage])

    return _run_guarded(go)


if __name__ == "__main__":
    # ``python -m o1pruner.cli STAGE ...`` is ``o1pruner STAGE ...``; anything else is ``o1pruner-train ...``.
    if len(sys.argv) > 1 and sys.argv[1] in STAGES:
        sys.exit(main(sys.argv[1:]))
    sys.exit(train_main(sys.argv[1:]))
