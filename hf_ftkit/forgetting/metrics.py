"""Forgetting metrics with lm-evaluation-harness's wikitext definitions, plus KL to the base model.

Each document is scored by its log-likelihood over disjoint rolling windows of ``window`` tokens (lm-eval's
``get_rolling_token_windows`` with ``context_len=1`` and ``make_disjoint_window``): the first window sees a
prefix token (BOS, else EOS) and predicts the first ``window`` tokens; each later window predicts the next
``window`` tokens from the one token before them. Summed over documents:

    token_perplexity = exp(NLL / tokens)     bits_per_byte = NLL / (bytes · ln 2)
    byte_perplexity  = exp(NLL / bytes)      word_perplexity = exp(NLL / words)

with ``bytes`` the UTF-8 length and ``words`` the whitespace-split count of each document, as lm-eval's
``wikitext`` task weights them. KL(base ‖ tuned) and greedy agreement are averaged over predicted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_ftkit._progress import track
from hf_ftkit.forgetting.heldout import Document

METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity", "nll_per_token", "kl",
           "top1_agreement")


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
class Sums:
    """Additive totals (so ranks can all-reduce them) from which every metric is derived."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    documents: int = 0
    kl: float = 0.0
    agree: int = 0
    compared: int = 0

    def add(self, other: Sums) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(list(asdict(self).values()), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> Sums:
        names = list(asdict(cls()))
        ints = {"tokens", "bytes", "words", "documents", "agree", "compared"}
        return cls(**{n: (round(float(v)) if n in ints else float(v))  # type: ignore[arg-type]
                      for n, v in zip(names, values, strict=True)})

    def metrics(self) -> dict[str, float | None]:
        if not self.tokens:
            return dict.fromkeys(METRICS)
        out: dict[str, float | None] = {
            "nll_per_token": self.nll / self.tokens,
            "token_perplexity": math.exp(self.nll / self.tokens),
            "bits_per_byte": self.nll / (self.bytes * math.log(2)),
            "byte_perplexity": math.exp(self.nll / self.bytes),
            "word_perplexity": math.exp(self.nll / self.words),
            "kl": self.kl / self.compared if self.compared else None,
            "top1_agreement": self.agree / self.compared if self.compared else None,
        }
        return out


@dataclass
class EncodedSet:
    """Held-out documents tokenized once, split into windows, grouped into batches by a token budget."""

    documents: list[Document]
    windows: list[Window]
    doc_of_window: list[int]
    batches: list[list[int]] = field(default_factory=list)

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
    kept, windows, owner, total = [], [], [], 0
    for doc in track(documents, "forgetting: tokenizing held-out text"):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if max_tokens is not None and total >= max_tokens:
            break
        total += len(ids)
        kept.append(doc)
        if (len(kept) - 1) % world != rank:
            continue
        for item in rolling_windows(ids, prefix, window):
            windows.append(item)
            owner.append(len(kept) - 1)
    encoded = EncodedSet(kept, windows, owner)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    batch: list[int] = []
    for index in order:
        length = len(windows[index].input_ids)
        if batch and (len(batch) + 1) * len(windows[batch[0]].input_ids) > max(batch_tokens, length):
            encoded.batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        encoded.batches.append(batch)
    return encoded


def _batch_tensors(encoded: EncodedSet, batch: list[int], pad: int, device: Any) -> tuple[torch.Tensor, ...]:
    width = max(len(encoded.windows[i].input_ids) for i in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, index in enumerate(batch):
        item = encoded.windows[index]
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        scored = torch.tensor(item.labels[-item.predicted:])
        labels[row, n - item.predicted:n] = scored
    return ids.to(device), labels.to(device), mask.to(device)


@dataclass
class BaseCache:
    """The base model's next-token distribution at every scored position, kept as top-k plus tail mass."""

    k: int
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (log-probs, indices)


def measure(
    model: Any,
    encoded: EncodedSet,
    *,
    pad_token: int,
    base_logprobs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    cache: BaseCache | None = None,
    capture: BaseCache | None = None,
    autocast_dtype: torch.dtype | None = None,
    extra_batches: int = 0,
) -> Sums:
    """Score the held-out set with ``model``; KL against ``base_logprobs`` (a callable giving the base's
    log-probs for a batch, e.g. under PEFT's ``disable_adapter``) or a ``cache`` captured earlier.
    ``capture`` stores this model's top-k distribution (the baseline for full fine-tuning).
    ``extra_batches`` dummy forwards keep ranks in step under FSDP when their shards differ in size.
    """
    device = next(model.parameters()).device
    sums = Sums(documents=len({encoded.doc_of_window[i] for i in range(len(encoded.windows))}))
    sums.bytes = sum(encoded.documents[d].bytes for d in set(encoded.doc_of_window))
    sums.words = sum(encoded.documents[d].words for d in set(encoded.doc_of_window))
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    with torch.inference_mode(), autocast:
        for number, batch in enumerate(track(encoded.batches, "forgetting: scoring held-out text")):
            ids, labels, padding = _batch_tensors(encoded, batch, pad_token, device)
            mask = None if bool(padding.all()) else padding  # no padding: the plain causal path
            logits = model(input_ids=ids, attention_mask=mask).logits
            sums.add(_score(logits, labels, number, base_logprobs, cache, capture, ids, mask))
        for _ in range(extra_batches):
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    return sums


def _score(logits: torch.Tensor, labels: torch.Tensor, number: int,
           base_logprobs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None,
           cache: BaseCache | None, capture: BaseCache | None, ids: torch.Tensor, mask: torch.Tensor | None) -> Sums:
    scored = labels != -100
    selected = logits[scored].float()  # (positions, vocab)
    targets = labels[scored]
    out = Sums(nll=_nll(selected, targets), tokens=int(scored.sum()))
    if base_logprobs is None and cache is None and capture is None:
        return out
    tuned = torch.log_softmax(selected, dim=-1)
    if capture is not None:
        top, index = tuned.topk(min(capture.k, tuned.shape[-1]), dim=-1)
        capture.batches.append((top.cpu(), index.cpu()))
    if base_logprobs is not None:
        base = torch.log_softmax(base_logprobs(ids, mask)[scored].float(), dim=-1)
        kl = (base.exp() * (base - tuned)).sum(-1)
        out.kl, out.agree = float(kl.double().sum()), int((base.argmax(-1) == tuned.argmax(-1)).sum())
        out.compared = out.tokens
    elif cache is not None:
        top, index = (t.to(tuned.device) for t in cache.batches[number])
        out.kl = float(topk_kl(top, index, tuned).double().sum())
        out.agree = int((index[:, 0] == tuned.argmax(-1)).sum())
        out.compared = out.tokens
    return out


def _nll(logits: torch.Tensor, targets: torch.Tensor, rows: int = 512) -> float:
    """Σ −log p(target). The normaliser ``max + log Σ exp(x − max)`` is assembled in float64 from float32 parts:
    rounding the whole log-sum-exp (~15 nats) to float32 would cost ~1e-6 of the NLL, more than the metric
    definitions are checked to, while the float32 sum of exponentials is accurate to ~1e-7 of its log."""
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start:start + rows]
        top = chunk.max(dim=-1, keepdim=True).values
        log_sum = torch.exp(chunk - top).sum(dim=-1).double().log()
        picked = chunk.gather(-1, targets[start:start + rows].unsqueeze(-1)).squeeze(-1).double()
        total += float((top.squeeze(-1).double() + log_sum - picked).sum())
    return total


def topk_kl(base_top: torch.Tensor, base_index: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """KL between base and tuned coarsened to the base's top-k tokens plus one "rest" bucket, per position.

    A lower bound of the full KL (merging outcomes never increases divergence) that equals it when k = vocab.
    """
    p_base = base_top.exp()
    tuned_top = tuned.gather(-1, base_index)
    head = (p_base * (base_top - tuned_top)).sum(-1)
    rest_base = (1 - p_base.sum(-1)).clamp_min(1e-12)
    rest_tuned = (1 - tuned_top.exp().sum(-1)).clamp_min(1e-12)
    return head + rest_base * (rest_base.log() - rest_tuned.log())


def all_reduce(sums: Sums) -> Sums:
    """Sum the totals over ranks when running distributed (documents are sharded, so totals add)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return sums
    values = sums.as_tensor()
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = values.to(backend_device)
    dist.all_reduce(values)
    return Sums.from_tensor(values.cpu())


def batches_in_step(encoded: EncodedSet) -> int:
    """How many dummy batches this rank must add so that every rank runs the same number of forwards."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    count = torch.tensor([len(encoded.batches)], dtype=torch.long)
    if dist.get_backend() == "nccl":
        count = count.cuda()
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item()) - len(encoded.batches)
