"""Held-out pretraining-style text: where it comes from, how it is sampled, and whether training saw it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError

TEXT_COLUMNS = ("text", "content", "document", "body", "page", "sentence")
FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
MIN_TOKENS = 256  # below this a perplexity is noise, not a measurement
_WORDS = re.compile(r"\s+")


@dataclass(frozen=True)
class Document:
    """One held-out document with the weights lm-evaluation-harness's wikitext task uses."""

    text: str
    truncated: bool = False  # cut to the token budget; bytes and words are those of the kept text

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def words(self) -> int:
        return len(_WORDS.split(self.text))


def load_texts(spec: str | Path | Sequence[str], *, column: str | None = None) -> list[str]:
    """Texts from a list of strings, a file (.txt/.md/.jsonl/.json/.parquet), a directory, or a dataset spec.

    A dataset spec is ``id[:config][:split]`` (default split ``test``), read with ``datasets``; online it streams.

    Raises:
        BadInputError: nothing found, or ``column`` missing.
    """
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [str(t) for t in spec]
    if str(spec) == "stdlib":  # the offline default recipes use too
        return stdlib_documents()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(Path(root) / name for root, _, names in os.walk(path)  # unreadable folders are skipped
                       for name in names if Path(name).suffix in FILE_SUFFIXES)
        if not files:
            raise BadInputError(f"{path} holds no {'/'.join(FILE_SUFFIXES)} files; point --data at text files.")
        return [t for f in files for t in _file_texts(f, column)]
    if path.is_file():
        return _file_texts(path, column)
    return _dataset_texts(str(spec), column)


def _file_texts(path: Path, column: str | None) -> list[str]:
    try:
        return _read_file_texts(path, column)
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text (a binary file?); pass text, JSON lines or parquet.") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not valid JSON (line {exc.lineno}); fix the file.") from None
    except OSError as exc:
        raise BadInputError(f"{path} cannot be read ({exc.strerror or exc}); pass a readable file.") from None


def _read_file_texts(path: Path, column: str | None) -> list[str]:
    if path.suffix in (".txt", ".md"):
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        rows = loaded if isinstance(loaded, list) else [loaded]
    return _column(rows, column, str(path))


def _column(rows: list[Any], column: str | None, where: str) -> list[str]:
    if rows and isinstance(rows[0], str):
        return [str(r) for r in rows]
    if not rows:
        return []
    if not all(isinstance(r, dict) for r in rows):
        raise BadInputError(f"{where} holds {type(rows[0]).__name__} rows, not text or objects with a text column; "
                            "pass one document per row.")
    keys = list(rows[0])
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in keys), None)
        if column is None:
            raise BadInputError(f"{where} has no text column ({', '.join(keys)}); pass the column to use.")
    elif column not in keys:
        raise BadInputError(f"{where} has no column {column!r} (it has {', '.join(keys)}); pass an existing one.")
    return [str(r[column]) for r in rows if r.get(column)]


def _dataset_texts(spec: str, column: str | None) -> list[str]:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "test"
    try:
        import datasets

        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            datasets.config.HF_HUB_OFFLINE = True  # read at import: a later setting would leave minutes of retries
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for "not found"/"offline"
        raise BadInputError(
            f"held-out data {spec!r} is not a file, a directory or a loadable dataset ({type(exc).__name__}); "
            "pass a path or an id[:config][:split] available offline."
        ) from None
    return _column(list(data), column, spec)


def sample_documents(texts: Iterable[str], *, max_bytes: int, seed: int = 0) -> list[Document]:
    """A deterministic sample: shuffle with ``seed``, keep documents until ``max_bytes`` of text."""
    pool = [t for t in texts if t and t.strip()]
    random.Random(seed).shuffle(pool)
    chosen, total = [], 0
    for text in pool:
        if total >= max_bytes:
            break
        chosen.append(Document(text))
        total += len(text.encode("utf-8"))
    return chosen


def stdlib_documents(limit: int | None = None) -> list[str]:
    """Real human-written English available offline everywhere: docstrings of the Python standard library."""
    import importlib
    import inspect
    import pkgutil
    import sys
    import warnings

    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith(("_", "idlelib", "tkinter", "turtle", "antigravity", "this")))
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # some stdlib modules need optional system libraries
                continue
            doc = inspect.getdoc(module)
            if doc and len(doc) > 400:
                texts.append(doc)
            if limit and len(texts) >= limit:
                break
    return texts


def _shingles(text: str, n: int = 13) -> set[str]:
    words = _WORDS.split(text.lower().strip())
    return {hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).hexdigest()
            for i in range(max(len(words) - n + 1, 1))} if words else set()


def overlapping(heldout: list[Document], training_texts: Iterable[str], *, n: int = 13) -> int:
    """How many held-out documents share a word ``n``-gram with the training texts (GPT-3's decontamination test)."""
    seen: set[str] = set()
    for text in training_texts:
        seen |= _shingles(text, n)
    return sum(1 for doc in heldout if _shingles(doc.text, n) & seen)
