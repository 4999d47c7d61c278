"""Exceptions and warnings raised by hf-ftkit.

The hierarchy::

    HfFtkitError                  base of every hf-ftkit error
    ├── BadInputError (ValueError)    a value the user passed is wrong; the CLI exits 2
    │   └── ModelNotFoundError        no config for MODEL in any place looked in
    ├── DoesNotFitError               a plan exceeds its budget (raised only on request)
    └── MergeVerificationError        a merged model's outputs differ from base + adapter; nothing written

    HfFtkitWarning (UserWarning)  something is probably wrong but the plan still stands

Every message is one sentence that names what was wrong and how to fix it.
"""

from __future__ import annotations


class HfFtkitError(Exception):
    """Base class of every error hf-ftkit raises on purpose."""


class BadInputError(HfFtkitError, ValueError):
    """A user-supplied value is invalid; the message names the field and the fix."""


class ModelNotFoundError(BadInputError):
    """The model's config could not be found in any of the places looked in."""


class DoesNotFitError(HfFtkitError):
    """A plan's peak memory exceeds its budget."""


class HfFtkitWarning(UserWarning):
    """A warning about a questionable but usable input (e.g. a sequence past the model's context)."""


class MergeVerificationError(HfFtkitError):
    """The merged model's outputs differ from base + adapter beyond the tolerance; nothing was written."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type's name when it has none: what
    a one-sentence error quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def raised_in(exc: BaseException) -> str:
    """The module whose code raised ``exc`` (its innermost frame), or "" when it has no traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""


def raised_by(exc: BaseException, package: str) -> bool:
    """Whether ``exc`` was raised inside ``package``'s code."""
    module = raised_in(exc)
    return module == package or module.startswith(f"{package}.")
