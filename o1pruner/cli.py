"""Command-line entry points.

``o1pruner run``: every stage (sample -> score -> train -> eval) in one resumable run;
``o1pruner sample|score|train|eval``: one stage; ``o1pruner demo``: the small embedded toy demo.
``o1pruner-train`` is ``o1pruner run`` (with no arguments at all, the demo); ``python -m o1pruner`` is
``o1pruner``.

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

from o1pruner.config import (
    GROUPS,
    STAGES,
    ConfigError,
    PipelineConfig,
    coerce_value,
    options,
    recipe_names,
    resolve_config,
)
from o1pruner.options import strip_optional

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_OUTPUT_DIR = "runs/toy-demo"

RUN_DESCRIPTION = """\
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
  o1pruner run --recipe r1-distill-qwen-1.5b --output-dir runs/r1-1.5b
  o1pruner run --model ./my-model --dataset train.jsonl --eval-dataset test.jsonl --k 8 --lam 2
  o1pruner demo
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (plus a close-match hint for a mistyped flag) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("--"):
            flag = match.group(1).split("=")[0]
            close = difflib.get_close_matches(flag, sorted(_option_strings(self)), n=2)
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of ``parser`` and of its commands (argparse reports a command's unknown flag at the top)."""
    out = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option, grouped by stage; defaults are SUPPRESSed so only given flags count."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of option values (keys: option names).")
    parser.add_argument(
        "--recipe", metavar="NAME", help=f"Packaged recipe to start from: {', '.join(recipe_names())}."
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for key, opt in options().items():
        f, base = opt.field, strip_optional(opt.type)[1]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        shown = "none" if default is None else default
        if isinstance(default, list):
            shown = ",".join(default) or "none"
        help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        group = groups[opt.group]
        kwargs: dict = {"dest": key, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(_flag(key), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            group.add_argument(_flag(key), metavar="A,B", **kwargs)
            continue
        metavar = {int: "N", float: "X"}.get(base, "STR" if base is str else None)
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
            metavar = None
        if key in ("model", "dataset", "eval_dataset", "output_dir"):
            metavar = "PATH" if key == "output_dir" else "NAME_OR_PATH"
        # Values stay strings here; the config checks them and names the flag in its message.
        group.add_argument(_flag(key), metavar=metavar, **kwargs)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return resolve_config(recipe=args.recipe, config_file=args.config, overrides=_overrides(args))


COMMAND_HELP = {
    "run": "every stage, sample -> score -> train -> eval (what o1pruner-train does)",
    "sample": "pre-sample K solutions per training problem (writes samples.jsonl, samples.done.json)",
    "score": "score the samples: rewards and reference log-probs (writes scored.parquet)",
    "train": "off-policy PPO-clip training (writes checkpoints/, metrics.jsonl, model/)",
    "eval": "evaluate the base and the tuned model; write eval.json, metrics.json, report.md, plots",
    "plan": "print each stage's planned peak GPU memory on the card (no weights loaded); exit 2 if one does not fit",
    "demo": f"the embedded toy demo on the CPU; flags override its settings (run directory {DEMO_OUTPUT_DIR})",
}


def _epilog() -> str:
    return EPILOG.format(recipes=", ".join(recipe_names()))


def build_run_parser(prog: str = "o1pruner-train") -> argparse.ArgumentParser:
    """The parser of ``o1pruner-train`` (the alias of ``o1pruner run``), with ``--demo``."""
    parser = ArgumentParser(
        prog=prog,
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"Run the embedded toy demo (what no arguments at all does); other flags override its settings "
        f"(default run directory: {DEMO_OUTPUT_DIR}).",
    )
    add_toy_split_argument(parser)
    add_config_arguments(parser)
    return parser


def add_toy_split_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--toy-split",
        choices=("validation", "test"),
        default="test",
        help="With the demo: evaluate on the toy's validation split (for choosing settings) or its test "
        f"split (the reported numbers; default). Default run directory {DEMO_OUTPUT_DIR}, "
        f"{DEMO_OUTPUT_DIR}-validation for the validation split.",
    )


def build_main_parser(prog: str = "o1pruner") -> argparse.ArgumentParser:
    """The parser of ``o1pruner COMMAND`` (and ``python -m o1pruner COMMAND``)."""
    parser = ArgumentParser(
        prog=prog,
        description="O1-Pruner (Length-Harmonizing Fine-Tuning) on one GPU: run every stage "
        "('run', the same as o1pruner-train), one stage, or the toy demo, in a resumable run directory.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", parser_class=ArgumentParser, metavar="{" + ",".join(COMMAND_HELP) + "}", required=True
    )
    for command, help_text in COMMAND_HELP.items():
        sp = sub.add_parser(
            command,
            help=help_text,
            description=RUN_DESCRIPTION if command == "run" else help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_epilog(),
        )
        add_config_arguments(sp)
        if command == "plan":
            sp.add_argument(
                "--gpu-memory-gb",
                type=float,
                default=None,
                metavar="GIB",
                help="Memory of the card to plan for, in GiB (default: the run's --card, else the visible GPU's).",
            )
        if command == "demo":
            add_toy_split_argument(sp)
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
    """The embedded toy demo (``o1pruner demo``, ``o1pruner-train`` with no arguments, or ``--demo``).

    ``o1pruner.toy.prepare_toy`` builds (or finds in its cache) a tiny long-thinking model and its problem
    files and returns the pipeline settings pointing at them; the standard pipeline then runs unchanged.
    Flags given with the demo override its settings; they are checked before the toy model is built.
    """
    from o1pruner.pipeline import Pipeline, log_progress
    from o1pruner.toy import prepare_toy  # the single call site of the toy package

    user = _overrides(args) if args is not None else {}
    config_file = args.config if args is not None else None
    if args is not None and args.recipe:
        raise ConfigError(
            "--demo and --recipe exclude each other (the demo brings its own model and problems)"
        )
    resolve_config(config_file=config_file, overrides=user)  # bad flags fail before the toy is built
    split = getattr(args, "toy_split", None) or "test"
    default_dir = DEMO_OUTPUT_DIR if split == "test" else f"{DEMO_OUTPUT_DIR}-{split}"
    output_dir = str(user.get("output_dir", default_dir))
    seed = coerce_value("seed", user.get("seed", 0), "command line")
    log_progress(
        f"toy demo: a tiny long-thinking model on running sums, evaluated on its {split} split, "
        f"run directory {output_dir}"
    )
    from o1pruner import distributed

    distributed.init()
    with distributed.main_first() as main:  # under a launcher rank 0 builds the toy, the others find it
        if main:
            assets = prepare_toy(output_dir, seed, split=split, log=log_progress)
    if not main:
        assets = prepare_toy(output_dir, seed, split=split, log=lambda msg: None)
    cfg = resolve_config(
        base=assets.overrides, config_file=config_file, overrides={**user, "output_dir": output_dir}
    )
    Pipeline(cfg).run(STAGES)
    distributed.shutdown()


def _overrides(args: argparse.Namespace) -> dict:
    names = set(PipelineConfig.field_names())
    return {k: v for k, v in vars(args).items() if k in names}


def run_command(command: str, args: argparse.Namespace) -> None:
    """Run one CLI command: ``demo``, ``run`` (every stage) or a single stage."""
    if command == "demo":
        run_toy_demo(args)
        return
    if command == "plan":
        from o1pruner.memory_plan import plan_run

        plan = plan_run(config_from_args(args).to_dict(), args.gpu_memory_gb)
        print(plan.table())
        if not plan.fits():
            raise ConfigError(plan.error_message())
        return
    from o1pruner import distributed
    from o1pruner.pipeline import Pipeline

    Pipeline(config_from_args(args)).run(STAGES if command == "run" else [command])
    distributed.shutdown()  # under a launcher: every process leaves together


def train_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``o1pruner-train``: ``o1pruner run``; with no arguments, the toy demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return _run_guarded(run_toy_demo)
    args = build_run_parser().parse_args(argv)  # argparse itself exits 2 on a malformed flag
    return _run_guarded(lambda: run_command("demo" if args.demo else "run", args))


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``o1pruner`` (and ``python -m o1pruner``): ``o1pruner COMMAND [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_main_parser().parse_args(argv)
    return _run_guarded(lambda: run_command(args.command, args))


if __name__ == "__main__":
    # ``python -m o1pruner.cli COMMAND ...`` is ``o1pruner COMMAND ...``; anything else is ``o1pruner-train ...``.
    if len(sys.argv) > 1 and sys.argv[1] in COMMAND_HELP:
        sys.exit(main(sys.argv[1:]))
    sys.exit(train_main(sys.argv[1:]))
