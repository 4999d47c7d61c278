"""``hf-ftkit``: the command-line entry point.

Exit codes: 0 ok, 1 the plan does not fit (``--check``) or a check failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from hf_ftkit.errors import BadInputError, HfFtkitError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

EXAMPLES = """examples:
  hf-ftkit plan meta-llama/Llama-3.1-8B --budget 24GiB
  hf-ftkit plan Qwen/Qwen2.5-7B --method qlora --gradient-checkpointing --budget rtx4090 --json
  hf-ftkit plan --list-models
  hf-ftkit compare meta-llama/Llama-3.1-70B --gpu h100 --tokens 50M --price-per-gpu-hour 2.5
  hf-ftkit merge ./base ./adapter --out ./merged --streaming
  hf-ftkit adapters inspect ./adapter --for vllm
  hf-ftkit forgetting --base ./base --model ./adapter --data ./heldout/ --json
  hf-ftkit train --config recipes/smollm2/135m_lora_demo.yaml
  hf-ftkit env
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one sentence and exit code 2 without usage noise."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"hf-ftkit: error: {message} (see `{self.prog} --help`).\n")


class _LazyConsole:
    """A rich ``Console`` built on first use, so that ``--json`` runs never import rich."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Any = None

    def _real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._real(), name, value)  # e.g. ``console.width = ...``


class _Subcommands:
    """``add_subparsers()``'s action, giving every subcommand the common flags (``--quiet``)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.action.add_parser(name, parents=[self.common], **kwargs)
        return parser


def make_parser() -> argparse.ArgumentParser:
    from hf_ftkit import __version__
    from hf_ftkit.cli import compare_cmd, env_cmd, forgetting_cmd, merge_cmd, plan_cmd, train_cmd

    parser = _Parser(
        prog="hf-ftkit",
        description="Memory planning and safer fine-tuning for the Hugging Face stack.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-ftkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, warnings or tables: errors only (--json output is still printed)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show third-party notices hidden by default (optional-kernel and deprecation noise)")
    sub = _Subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser), common)
    plan_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    merge_cmd.add_parser(sub)
    forgetting_cmd.add_parser(sub)
    train_cmd.add_parser(sub)
    env_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the exit code."""
    parser = make_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported in one line)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from hf_ftkit._progress import set_quiet

    set_quiet(bool(args.quiet))
    if not getattr(args, "verbose", False):
        _hide_library_noise()
    console = _LazyConsole(stderr=False, highlight=False, soft_wrap=False, quiet=bool(args.quiet))
    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            return int(args.func(args, console))
    except BadInputError as exc:
        print(f"hf-ftkit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except HfFtkitError as exc:
        print(f"hf-ftkit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hf-ftkit: interrupted; nothing was left half-written.", file=sys.stderr)
        return EXIT_INTERRUPTED


# Notices that third-party libraries print on every run and that tell a user nothing they can act on; real
# warnings are untouched, and --verbose shows these too.
NOISE_LOGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
              # kernels >= 0.19, asked by bitsandbytes for its optional CPU kernel while the hub is offline
              "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/"}
NOISE_WARNINGS = (r".*is_gradient_checkpointing.* is deprecated",)  # PEFT reads the deprecated property


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_NOISE_FILTERS = {name: _DropPrefix(prefix) for name, prefix in NOISE_LOGS.items()}


def _hide_library_noise() -> None:
    for name, noise in _NOISE_FILTERS.items():
        logging.getLogger(name).addFilter(noise)  # the same object each time: added once, however often main runs
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
