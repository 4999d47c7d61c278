"""Command-line flags generated from ``PlanInputs``' fields, as ``HfArgumentParser`` does for TRL's configs:
type, choices (from ``Literal``) and help come from the dataclass, written once there.

The metadata stays what ``HfArgumentParser`` accepts (``help``, ``choices``); the CLI's own spellings live
here: shorter flag names users already know (``--grad-accum``) and the help of a ``--no-...`` flag, which
booleans that default to True get. Tuples are comma-separated lists.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, Field, fields
from typing import Any, get_args, get_origin

from hf_ftkit.planner.inputs import PlanInputs


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


FLAG_NAMES = {"gradient_accumulation_steps": "--grad-accum"}
NEGATED_HELP = {"double_quant": "QLoRA without double quantization."}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(PlanInputs)


def flag_of(item: Field[Any]) -> str:
    name = FLAG_NAMES.get(item.name) or f"--{item.name.replace('_', '-')}"
    default = item.default if item.default is not MISSING else None
    return f"--no-{name[2:]}" if _hints()[item.name] is bool and default is True else name


def add_input_flags(parser: argparse.ArgumentParser, names: list[str] | None = None,
                    overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Add one flag per ``PlanInputs`` field (or per field in ``names``), with ``argparse`` keyword
    ``overrides`` per field name (``{"shard": {"default": None, "help": ...}}``)."""
    hints = _hints()
    for item in fields(PlanInputs):
        if names is not None and item.name not in names:
            continue
        kind, default = hints[item.name], item.default
        options: dict[str, Any] = {"dest": item.name, "help": item.metadata.get("help")}
        if kind is bool:
            options["action"] = "store_false" if default is True else "store_true"
            if default is True:
                options["help"] = NEGATED_HELP.get(item.name, options["help"])
        elif get_origin(kind) is typing.Literal:
            options.update(choices=get_args(kind), default=default)
        elif kind is int:
            options.update(type=positive_int, default=default)
        elif kind is float:
            options.update(type=float, default=default)
        elif get_origin(kind) is tuple:
            options.update(default=",".join(default if isinstance(default, tuple) else ()), metavar="A,B")
        else:
            options.update(default=default)
        if "choices" in item.metadata:
            options["choices"] = item.metadata["choices"]
            options.pop("type", None)
        options.update((overrides or {}).get(item.name, {}))
        flag = flag_of(item)
        if "action" not in options and "choices" not in options:
            options.setdefault("metavar", flag[2:].upper().replace("-", "_"))
        if options.get("default") not in (None, "") and "action" not in options and options.get("help"):
            options["help"] = options["help"].rstrip(".") + " (default %(default)s)."
        parser.add_argument(flag, **options)


def input_values(args: argparse.Namespace, names: list[str] | None = None) -> dict[str, Any]:
    """The ``PlanInputs`` keyword arguments the parsed flags give (fields left at None are omitted)."""
    hints = _hints()
    values: dict[str, Any] = {}
    for item in fields(PlanInputs):
        if (names is not None and item.name not in names) or not hasattr(args, item.name):
            continue
        value = getattr(args, item.name)
        if value is None:
            continue
        if get_origin(hints[item.name]) is tuple:
            value = tuple(part.strip() for part in str(value).split(",") if part.strip())
        values[item.name] = value
    return values
