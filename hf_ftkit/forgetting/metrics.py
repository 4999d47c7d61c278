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
from hf_ftkit.forgetting.windows import EncodedSet

METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity", "nll_per_token", "kl",
           "top1_agreement")
SCORE_ROWS = 32  # positions scored together: a few MB of logits stays in cache, where whole batches would not
HEAD_ROWS = 512  # positions per output-head matmul on cached hidden states (reads the head's weight once each)


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
    base_nll: float = 0.0  # the base's own NLL, where its exact logits were at hand (for KL)
    base_scored: int = 0

    def add(self, other: Sums) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(list(asdict(self).values()), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> Sums:
        names = list(asdict(cls()))
        ints = {"tokens", "bytes", "words", "documents", "agree", "compared", "base_scored"}
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

    def base_metrics(self) -> dict[str, float | None] | None:
        """The base's metrics from the same pass (KL 0 against itself), when its exact logits were computed."""
        if not self.tokens or self.base_scored != self.tokens:
            return None
        own = Sums(nll=self.base_nll, tokens=self.tokens, bytes=self.bytes, words=self.words,
                   documents=self.documents, kl=0.0, agree=self.tokens, compared=self.tokens)
        return own.metrics()


Segment = tuple[int, int, int]  # (row, first scored position, one past the last) within a batch


def _batch_tensors(encoded: EncodedSet, batch: list[int], pad: int,
                   device: Any) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    width = max(len(encoded.windows[i].input_ids) for i in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    segments: list[Segment] = []
    for row, index in enumerate(batch):
        item = encoded.windows[index]
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        segments.append((row, n - item.predicted, n))
    return ids.to(device), mask.to(device), segments


def _targets(encoded: EncodedSet, batch: list[int], device: Any) -> torch.Tensor:
    """The predicted tokens of a batch, in segment order."""
    labels = [t for index in batch for t in encoded.windows[index].labels[-encoded.windows[index].predicted:]]
    return torch.tensor(labels, dtype=torch.long, device=device)


@dataclass
class BaseCache:
    """The base model's next-token distribution at every scored position, kept as top-k plus tail mass."""

    k: int
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (log-probs, indices)


@dataclass
class HiddenCache:
    """The base model's final hidden states (its output head's input) at every scored position, kept on the CPU.

    While the base stays frozen (PEFT), its exact logits are the output head applied to these: a later
    measurement costs one forward pass of the tuned model plus the head, instead of two full forward passes.
    ``valid`` turns false when the model's logits are not the plain head of its hidden states (soft-capping,
    scaling) or the head cannot run outside the forward (sharded weights).
    """

    batches: list[torch.Tensor] = field(default_factory=list)
    valid: bool = True


Logits = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Reference:
    """Where the base distribution comes from for KL: a forward pass, the head on cached hidden states, or a
    top-k cache. ``capture`` / ``capture_hidden`` are filled during the pass (the baseline)."""

    forward: Logits | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    hidden: HiddenCache | None = None
    cache: BaseCache | None = None
    capture: BaseCache | None = None
    capture_hidden: HiddenCache | None = None
    head_module: Any = None  # the module whose input is captured into ``capture_hidden``


class MeasurementCancelled(Exception):
    """A measurement stopped between batches because ``cancel()`` turned true (a preemption signal)."""


def measure(model: Any, encoded: EncodedSet, *, pad_token: int, forward: Logits | None = None,
            reference: Reference | None = None, autocast_dtype: torch.dtype | None = None,
            extra_batches: int = 0, cancel: Callable[[], object] | None = None) -> Sums:
    """Score the held-out set with ``forward`` (default: ``model`` itself) and, when ``reference`` gives the
    base distribution, KL(base ‖ model) and greedy agreement.

    ``extra_batches`` dummy forwards keep ranks in step under FSDP when their shards differ in size.
    """
    device = next(model.parameters()).device
    forward = forward or (lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)
    ref = reference or Reference()
    sums = Sums(documents=len({encoded.doc_of_window[i] for i in range(len(encoded.windows))}))
    sums.bytes = sum(encoded.documents[d].bytes for d in set(encoded.doc_of_window))
    sums.words = sum(encoded.documents[d].words for d in set(encoded.doc_of_window))
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    seen: list[torch.Tensor] = []
    hook = (ref.head_module.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
            if ref.capture_hidden is not None and ref.head_module is not None else None)
    try:
        with torch.inference_mode(), autocast:
            for number, batch in enumerate(track(encoded.batches, "forgetting: scoring held-out text")):
                if cancel is not None and cancel():
                    raise MeasurementCancelled
                ids, padding, segments = _batch_tensors(encoded, batch, pad_token, device)
                mask = None if bool(padding.all()) else padding  # no padding: the plain causal path
                seen.clear()
                logits = forward(ids, mask)
                base_logits = ref.forward(ids, mask) if ref.forward is not None else None
                if ref.capture_hidden is not None:  # the last forward of the batch is the base's
                    _capture_hidden(ref, seen, segments, base_logits if base_logits is not None else logits)
                sums.add(_score(logits, _targets(encoded, batch, device), segments, number, ref, base_logits))
            for _ in range(extra_batches):
                model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        if hook is not None:
            hook.remove()
    return sums


def _rows(tensor: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    return torch.cat([tensor[row, start:end] for row, start, end in segments])


def _capture_hidden(ref: Reference, seen: list[torch.Tensor], segments: list[Segment],
                    base_logits: torch.Tensor) -> None:
    cache = ref.capture_hidden
    assert cache is not None
    if not cache.valid:
        return
    if not seen or ref.head is None or seen[-1].shape[:2] != base_logits.shape[:2]:
        cache.valid = False
        return
    hidden = _rows(seen[-1], segments)
    if not cache.batches:  # the head alone must reproduce the model's logits, else the cache is of no use
        row, start, _ = segments[0]
        expected = base_logits[row, start:start + 8].float()
        try:
            got = ref.head(hidden[:8]).float()
        except (RuntimeError, ValueError):  # e.g. a sharded head that only runs inside the forward
            got = None
        if got is None or got.shape != expected.shape or not torch.allclose(
                got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
            cache.valid = False
            return
    cache.batches.append(hidden.to("cpu", copy=True))


def _score(logits: torch.Tensor, targets: torch.Tensor, segments: list[Segment], number: int, ref: Reference,
           base_logits: torch.Tensor | None) -> Sums:
    """Sums for one batch, computed a few positions at a time (no copy of the whole batch's logits)."""
    totals = torch.zeros(4, dtype=torch.float64, device=logits.device)  # NLL, KL, agreeing positions, base NLL
    hidden = ref.hidden.batches[number] if ref.hidden is not None and ref.head is not None else None
    cached = tuple(t.to(logits.device) for t in ref.cache.batches[number]) if ref.cache is not None else None
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    offset = 0
    for row, start, end in segments:
        for block in range(start, end, HEAD_ROWS):
            stop = min(block + HEAD_ROWS, end)
            base = None
            if base_logits is not None:
                base = base_logits[row, block:stop]
            elif hidden is not None:
                assert ref.head is not None
                base = ref.head(hidden[offset:offset + stop - block].to(logits.device))
            for first in range(0, stop - block, SCORE_ROWS):
                last = min(first + SCORE_ROWS, stop - block)
                where = slice(offset + first, offset + last)
                tuned = logits[row, block + first:block + last].float()
                _score_rows(totals, tuned, targets[where], None if base is None else base[first:last].float(),
                            None if cached is None else (cached[0][where], cached[1][where]), ref.capture,
                            captured)
            offset += stop - block
    if ref.capture is not None:
        ref.capture.batches.append((torch.cat([c[0] for c in captured]).cpu(),
                                    torch.cat([c[1] for c in captured]).cpu()))
    nll, kl, agree, base_nll = totals.tolist()
    exact = base_logits is not None or hidden is not None  # the base's logits themselves, not its top-k
    compared = int(targets.numel()) if exact or cached is not None else 0
    return Sums(nll=nll, tokens=int(targets.numel()), kl=kl, agree=round(agree), compared=compared,
                base_nll=base_nll if exact else 0.0, base_scored=int(targets.numel()) if exact else 0)


def _score_rows(totals: torch.Tensor, tuned: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None,
                cached: tuple[torch.Tensor, torch.Tensor] | None, capture: BaseCache | None,
                captured: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add NLL, KL, agreement and the base's NLL of a few positions to ``totals`` (on the device: no sync).

    Each log-sum-exp is assembled in float64 from float32 parts: rounding the whole normaliser (~15 nats) to
    float32 would cost ~1e-6 of the NLL, more than the metric definitions are checked to, while float32 sums of
    exponentials are accurate to ~1e-7 of their log.
    """
    argmax, _, _, lse = _normalise(tuned)
    totals[0] += _nll(tuned, lse, targets)
    if capture is not None:
        values, index = tuned.topk(min(capture.k, tuned.shape[-1]), dim=-1)
        captured.append(((values.double() - lse.unsqueeze(-1)).float(), index))
    if base is not None:
        base_argmax, weights, total, base_lse = _normalise(base)
        totals[3] += _nll(base, base_lse, targets)
        # KL = Σ p_base (base − tuned) + lse_tuned − lse_base, with p_base = weights / total
        kl = (weights * (base - tuned)).sum(dim=-1).double() / total + (lse - base_lse)
        totals[1] += kl.sum()
        totals[2] += (base_argmax == argmax).sum()
    elif cached is not None:
        base_top, base_index = cached
        tuned_top = (tuned.gather(-1, base_index).double() - lse.unsqueeze(-1)).float()
        totals[1] += topk_kl(base_top, tuned_top).double().sum()
        totals[2] += (base_index[:, 0] == argmax).sum()


def _normalise(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: the argmax, exp(logits − max), their float64 sum and the float64 log-sum-exp."""
    top, argmax = logits.max(dim=-1)
    weights = torch.exp(logits - top.unsqueeze(-1))
    total = weights.sum(dim=-1).double()
    return argmax, weights, total, top.double() + total.log()


def _nll(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ −log p(target) over the positions, in float64."""
    return (lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()).sum()


def topk_kl(base_top: torch.Tensor, tuned_top: torch.Tensor) -> torch.Tensor:
    """KL between base and tuned coarsened to the base's top-k tokens plus one "rest" bucket, per position.

    ``base_top`` holds the base's top-k log-probs and ``tuned_top`` the tuned model's log-probs of the same
    tokens. A lower bound of the full KL (merging outcomes never increases divergence) that equals it when
    k = vocab.
    """
    p_base = base_top.exp()
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
