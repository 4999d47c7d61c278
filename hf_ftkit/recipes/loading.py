"""Reading a recipe: safe YAML, every key checked against TRL's dataclasses and ours, CLI overrides on top."""

from __future__ import annotations

import argparse
import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.methods import method_info
from hf_ftkit.recipes.arguments import FtkitArguments

RESERVED = ("env",)  # TRL's own top-level key: environment variables to set


@dataclass
class Recipe:
    """A validated recipe: TRL's three argument objects, hf-ftkit's, and where each value came from.

    Attributes:
        script: ``trl.ScriptArguments`` (dataset name, config, splits).
        training: ``trl.SFTConfig``.
        model: ``trl.ModelConfig`` (model path, dtype, LoRA and quantization keys; set from ``method``).
        ftkit: :class:`FtkitArguments`.
        path: the recipe file.
        values: the keys the recipe and the command line set, as resolved (what ``recipe.yaml`` records).
    """

    script: Any
    training: Any
    model: Any
    ftkit: FtkitArguments
    path: Path
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def explicit(self) -> set[str]:
        return set(self.values)


class _Parser:
    """``trl.TrlParser`` over TRL's dataclasses and :class:`FtkitArguments`, with errors as BadInputError."""

    def __init__(self) -> None:
        from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

        class Parser(TrlParser):
            def error(self, message: str) -> Any:  # argparse would print usage and exit
                raise BadInputError(f"{message}.")

        self.parser = Parser((ScriptArguments, SFTConfig, ModelConfig, FtkitArguments))  # type: ignore[arg-type]
        self.actions = {a.dest: a for a in self.parser._actions if a.dest != "help"}

    def check_key(self, key: str, where: str) -> argparse.Action:
        action = self.actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(self.actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInputError(f"{where}: unknown key {key!r}{hint}; recipes take the keys of trl.ScriptArguments, "
                                "trl.ModelConfig, trl.SFTConfig and hf-ftkit's FtkitArguments.")
        return action

    def coerce(self, key: str, value: Any, where: str) -> Any:
        """The value as the flag's own type would parse it; a wrong type is an error naming the key."""
        action = self.check_key(key, where)
        if value is None or isinstance(value, dict) or action.type is None:
            return value
        if isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise BadInputError(f"{where}: {key} takes one value, got a list {value!r}.")
            return [self._one(key, action, v, where) for v in value]
        return self._one(key, action, value, where)

    @staticmethod
    def _one(key: str, action: argparse.Action, value: Any, where: str) -> Any:
        kind: Any = action.type
        expected = getattr(kind, "__name__", "a valid value")
        if kind in (int, float) and isinstance(value, bool):
            raise BadInputError(f"{where}: {key} expects {expected}, got {value!r}.")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise BadInputError(f"{where}: {key} expects an integer, got {value!r}.")
        try:
            converted = kind(value if isinstance(value, (str, bool)) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            raise BadInputError(f"{where}: {key} expects {expected}{choices}, got {value!r}.") from None
        if action.choices and converted not in action.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInputError(f"{where}: {key} {value!r} is not one of "
                                f"{', '.join(map(str, action.choices))}{hint}.")
        return converted


def read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file as a mapping; safe loading only (no Python tags)."""
    import yaml

    if path.is_dir():
        raise BadInputError(f"--config {path} is a directory; pass the path of a recipe YAML in it (see recipes/).")
    if not path.is_file():
        raise BadInputError(f"recipe file {path} does not exist; pass the path of a recipe YAML (see recipes/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadInputError(f"--config {path} is not a text file (binary?); pass a recipe YAML.") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInputError(f"{path}{line}: YAML syntax error: {exc.problem}; fix the file there.") from None
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML ({exc}).") from None
    if data is None:
        raise BadInputError(f"{path} is empty; a recipe needs at least model_name_or_path and dataset_name.")
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a recipe is a mapping of keys to values, not a {type(data).__name__}.")
    return data


def _override_keys(overrides: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in overrides if a.startswith("--")]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, type-check and validate a recipe, with ``--key value`` command-line overrides applied.

    Raises:
        BadInputError: a missing file, a YAML syntax error (with its line), an unknown key (with a
            suggestion), a wrong type, or keys that contradict each other.

    Example:
        >>> recipe = load_recipe("recipes/smollm2/135m_lora_demo.yaml", ["--learning_rate", "1e-4"])
        >>> recipe.training.learning_rate
        0.0001
    """
    path = Path(path)
    overrides = list(overrides or [])
    data = read_yaml(path)
    parser = _Parser()
    where = str(path)
    values = {k: parser.coerce(k, v, where) for k, v in data.items() if k not in RESERVED}
    for key in _override_keys(overrides):
        parser.check_key(key[3:] if key.startswith("no_") and key[3:] in parser.actions else key, "command line")
    if "env" in data:
        if not isinstance(data["env"], dict):
            raise BadInputError(f"{where}: env must be a mapping of variable names to values.")
        for name, value in data["env"].items():
            os.environ[str(name)] = str(value)
    parse_values = dict(values)
    cpu_only = "use_cpu" not in values and "--use_cpu" not in overrides and not _has_gpu()
    if cpu_only:  # let a GPU recipe be validated and planned here; train() refuses to run it as it is
        parse_values["use_cpu"] = True
    parser.parser.set_defaults_with_config(**parse_values)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' renames of TRL's own defaults
            script, training, model, ftkit, rest = parser.parser.parse_args_into_dataclasses(
                args=overrides, return_remaining_strings=True)
    except BadInputError as exc:
        raise BadInputError(f"command line: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{where}: {str(exc).splitlines()[0]}") from None
    if rest:
        raise BadInputError(f"command line: unexpected {' '.join(rest)!r}; overrides look like --learning_rate 1e-4.")
    for key in _override_keys(overrides):
        key = key[3:] if key.startswith("no_") and not any(hasattr(o, key) for o in (script, training, model, ftkit)) \
            else key
        for obj in (script, training, model, ftkit):
            if hasattr(obj, key):
                values[key] = getattr(obj, key)
                break
    if cpu_only and "use_cpu" not in values:
        training.use_cpu = False
    recipe = Recipe(script, training, model, ftkit, path, values)
    validate(recipe)
    return recipe


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def validate(recipe: Recipe) -> None:
    """Contradictions between keys, and inputs that cannot work; sets TRL's PEFT/quantization keys from method."""
    from hf_ftkit.recipes.arguments import parse_hardware

    m, f, set_keys, where = recipe.model, recipe.ftkit, recipe.explicit, str(recipe.path)
    if not m.model_name_or_path:
        raise BadInputError(f"{where}: model_name_or_path is missing; name a hub id or a model directory.")
    if not recipe.script.dataset_name:
        raise BadInputError(f"{where}: dataset_name is missing; name a hub dataset or a local file or directory.")
    from hf_ftkit.recipes.data import resolve_dataset, resolve_model_path

    m.model_name_or_path = resolve_model_path(str(m.model_name_or_path), recipe.path)
    resolve_dataset(str(recipe.script.dataset_name), recipe.path)
    method = f.method
    info = method_info(method) if method != "auto" else None
    implied = {"use_peft": bool(info and info.is_peft), "load_in_4bit": bool(info and info.quantized_base),
               "use_dora": bool(info and info.dora)}
    for key, wanted in implied.items():
        if key in set_keys and method == "auto":
            raise BadInputError(f"{where}: {key} contradicts method: auto, which chooses it; drop {key}.")
        if key in set_keys and bool(getattr(m, key)) != wanted and not (key == "use_dora" and method == "qlora"):
            fix = {"use_peft": "lora", "load_in_4bit": "qlora", "use_dora": "dora"}[key]
            raise BadInputError(f"{where}: {key}: {getattr(m, key)} contradicts method: {method}; "
                                f"drop {key} or use method: {fix if getattr(m, key) else 'full'}.")
    if getattr(m, "load_in_8bit", False):
        raise BadInputError(f"{where}: load_in_8bit is not a recipe method; use method: qlora (4-bit) or lora.")
    if method != "auto":
        m.use_peft, m.load_in_4bit = implied["use_peft"], implied["load_in_4bit"]
        m.use_dora = implied["use_dora"] or (method == "qlora" and bool(m.use_dora))
    if f.merge and info is not None and not info.is_peft:
        raise BadInputError(f"{where}: merge: true needs an adapter; method: full already writes the whole model.")
    hardware = parse_hardware(f.hardware) if f.hardware else None
    if hardware and hardware.gpus * hardware.nodes > 1 and f.shard == "none":
        raise BadInputError(f"{where}: hardware {f.hardware!r} has several GPUs but shard: none; use ddp, fsdp, "
                            "zero2 or zero3 (as your accelerate config does).")
    if method == "auto" and not (f.budget or (hardware and hardware.gpu)):
        raise BadInputError(f"{where}: method: auto needs a budget or a GPU in hardware to choose against.")
    if f.fallback and not (f.budget or (hardware and hardware.gpu)):
        raise BadInputError(f"{where}: fallback: true needs a budget or a GPU in hardware to step down against.")
    if m.lora_target_modules == ["all-linear"]:
        m.lora_target_modules = "all-linear"  # PEFT's keyword, not a module name
