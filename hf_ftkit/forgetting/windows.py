"""Held-out documents as lm-eval scores them: tokenized without special tokens, cut into disjoint rolling
windows (``context_len=1``), grouped into batches of similar length under a token budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_ftkit._progress import track
from hf_ftkit.forgetting.heldout import Document

SAME_LENGTH = 0.95  # windows batched together differ in length by at most 5%


@dataclass
class Window:
    """One scored window: ``input_ids`` (model input) and how many of its last positions are predicted."""

    input_ids: list[int]
    labels: list[int]
    predicted: int


def rolling_windows(tokens: list[int], prefix_token: int, window: int) -> list[Window]:
    """lm-eval's disjoint rolling windows of one document (context_len = 1)."""
    if not tokens:
        return []
    first = min(window, len(tokens))
    windows = [Window([prefix_token, *tokens[: first - 1]], tokens[:first], first)]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, window)
        end = done + count
        start = max(end - window - 1, 0)
        full = tokens[start:end]  # context tokens then the `count` predicted ones
        windows.append(Window(full[:-1], full[1:], count))
        done = end
    return windows


@dataclass
class EncodedSet:
    """Held-out documents tokenized once, split into windows, grouped into batches by a token budget."""

    documents: list[Document]
    windows: list[Window]
    doc_of_window: list[int]
    batches: list[list[int]] = field(default_factory=list)
    truncated: int = 0  # documents cut short to stay within max_tokens (the last one taken)

    @property
    def tokens(self) -> int:
        return sum(w.predicted for w in self.windows)


def encode(documents: list[Document], tokenizer: Any, *, window: int, batch_tokens: int,
           max_tokens: int | None = None, rank: int = 0, world: int = 1) -> EncodedSet:
    """Tokenize (no special tokens, as lm-eval does), cut to ``max_tokens`` whole documents, window, batch.

    With ``world`` > 1 this rank keeps every ``world``-th document starting at ``rank``.
    """
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with.")
    kept, windows, owner, total, truncated = [], [], [], 0, 0
    for doc in track(documents, "forgetting: tokenizing held-out text"):
        if max_tokens is not None and total >= max_tokens:
            break
        left = None if max_tokens is None else max_tokens - total
        ids, doc = _tokens(doc, tokenizer, left)
        truncated += doc.truncated
        total += len(ids)
        kept.append(doc)
        if (len(kept) - 1) % world != rank:
            continue
        for item in rolling_windows(ids, prefix, window):
            windows.append(item)
            owner.append(len(kept) - 1)
    encoded = EncodedSet(kept, windows, owner, truncated=truncated)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    batch: list[int] = []
    for index in order:
        length = len(windows[index].input_ids)
        widest = len(windows[batch[0]].input_ids) if batch else length
        # a batch ends at the token budget, or before a window 5% shorter than its first: padding is compute
        if batch and ((len(batch) + 1) * widest > max(batch_tokens, length) or length < SAME_LENGTH * widest):
            encoded.batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        encoded.batches.append(batch)
    return encoded


CHARS_PER_TOKEN_CAP = 64  # text read per token still allowed: no tokenizer's tokens are longer in practice


def _tokens(doc: Document, tokenizer: Any, left: int | None) -> tuple[list[int], Document]:
    """The document's tokens, at most ``left`` of them: a longer document is cut (only its first
    ``left × CHARS_PER_TOKEN_CAP`` characters are tokenized) and replaced by the text its kept tokens cover,
    so bytes and words stay those of what is scored."""
    if left is None:
        return tokenizer(doc.text, add_special_tokens=False)["input_ids"], doc
    text = doc.text[:left * CHARS_PER_TOKEN_CAP]
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(encoded["input_ids"])
    if len(ids) <= left and len(text) == len(doc.text):
        return ids, doc
    ids = ids[:left]
    kept = doc.text[:encoded["offset_mapping"][len(ids) - 1][1]] if fast else tokenizer.decode(ids)
    return ids, Document(kept, truncated=True)

