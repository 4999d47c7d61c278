"""Loading a model or tokenizer the user named, safely: no remote code unless asked, no pickle unless allowed,
and one sentence (not a traceback) when the path is not a loadable model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError

# What transformers raises for a folder that is not a model (missing or unreadable files, a config it cannot
# parse, remote code it was told not to run, weights that do not fit the config).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, UnicodeDecodeError)


def check_model_dir(path: str | Path, flag: str, *, allow_pickle: bool = False,
                    trust_remote_code: bool = False) -> Path:
    """The local folder of ``path`` (a directory, or a hub id in the Hugging Face cache); one sentence when it is
    not a model hf-ftkit may load: missing, pickle-only without ``allow_pickle``, or custom code without
    ``trust_remote_code``."""
    text = str(path)
    local = Path(text).expanduser()
    looks_local = local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if not looks_local:
        from hf_ftkit.merge.base import resolve_base_dir

        try:  # a hub id: from the Hugging Face cache only (no minutes of retries against an unreachable hub)
            local = resolve_base_dir(text)
        except BadInputError:
            raise BadInputError(f"{flag} {text} is neither a local model directory nor in the Hugging Face cache; "
                                f"download it first (`hf download {text}`) or pass its folder.") from None
    if not local.is_dir():
        raise BadInputError(f"{flag} {text} is not a model directory (it does not exist or is a file); pass the "
                            "folder save_pretrained wrote.")
    if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
        raise BadInputError(f"{flag} {text} has no config.json; pass the folder save_pretrained wrote.")
    if not trust_remote_code and _needs_remote_code(local):
        raise BadInputError(f"{flag} {text} needs its own modelling code (auto_map in its config), which hf-ftkit "
                            "does not run unasked; pass --trust-remote-code only if you trust its author.")
    pickled = list(local.glob("*.bin")) or list(local.glob("*.pt"))
    if pickled and not list(local.glob("*.safetensors")) and not allow_pickle:
        raise BadInputError(f"{flag} {text} holds pickle weights only ({pickled[0].name}), which can run code when "
                            "loaded; convert them to safetensors or pass --allow-pickle if you trust them.")
    return local


def _needs_remote_code(folder: Path) -> bool:
    import json

    for name in ("config.json", "adapter_config.json"):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            return True
    return False


def load_causal_lm(path: str | Path, flag: str, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` that never runs (or asks about) remote code unless told to."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except _LOAD_ERRORS as exc:
        raise BadInputError(f"{flag} {path} could not be loaded as a causal LM ({_reason(exc)}); "
                            + _fix(exc)) from None


def load_tokenizer(path: str | Path, flag: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise BadInputError(f"the tokenizer of {flag} {path} could not be loaded ({_reason(exc)}); "
                            + _fix(exc)) from None


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:200].rstrip(".")


def _fix(exc: BaseException) -> str:
    if "trust_remote_code" in str(exc):
        return "it needs custom code: pass --trust-remote-code only if you trust its author."
    return "pass a complete save_pretrained folder."
