"""What to change when a plan does not fit, and what fits a budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hf_ftkit.planner.activations import padded_batch
from hf_ftkit.planner.estimate import Plan, estimate
from hf_ftkit.planner.inputs import METHODS, PlanInputs
from hf_ftkit.planner.methods import quantized_twin
from hf_ftkit.planner.spec import ModelSpec

KEEP_FULL = 2  # suggestions that keep full fine-tuning, shown for a full fine-tune whatever adapters save


@dataclass(frozen=True)
class Suggestion:
    """One change to the configuration, the plan it gives, and what it saves per device."""

    label: str
    changes: dict[str, object]
    peak_bytes: int
    saves_bytes: int
    fits: bool | None


def _micro_batch_label(inputs: PlanInputs, batch: int) -> str:
    accum = inputs.gradient_accumulation_steps * inputs.batch_size // batch
    return f"micro-batch {batch} + grad accumulation {accum}"


def _candidates(inputs: PlanInputs) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = []
    if not inputs.gradient_checkpointing:
        out.append(("gradient checkpointing", {"gradient_checkpointing": True}))
    if not inputs.is_peft:
        out.append(("LoRA", {"method": "lora"}))
        if not inputs.gradient_checkpointing:
            out.append(("LoRA + gradient checkpointing", {"method": "lora", "gradient_checkpointing": True}))
    if not inputs.quantized_base:
        # the same adapter on a 4-bit base (QDoRA for DoRA, QLoRA otherwise), from the method table
        twin = quantized_twin(inputs.info.adapter or "lora")
        out.append((twin.label, {"method": twin.name}))
        out.append((f"{twin.label} + gradient checkpointing", {"method": twin.name, "gradient_checkpointing": True}))
    if "8bit" not in inputs.optim and inputs.optim not in ("sgd", "adafactor"):
        out.append(("8-bit AdamW (paged_adamw_8bit)", {"optim": "paged_adamw_8bit"}))
    if not inputs.is_peft and inputs.precision != "bf16":
        out.append(("pure bf16 weights and states", {"precision": "bf16"}))
    if not inputs.use_liger_kernel:
        out.append(("Liger fused linear cross-entropy", {"use_liger_kernel": True}))
    if padded_batch(inputs):  # the padding mask, its per-layer SDPA copies and k/v repeated to the query heads
        # flash attention only: SDPA and eager would hold the padding-free row's (B·S)² mask instead
        out.append(("padding-free batches with flash attention (TRL padding_free)",
                    {"padding_free": True, "attn_implementation": "flash_attention_2"}))
    if inputs.batch_size > 1:
        for batch in sorted({max(1, inputs.batch_size // 2), 1}, reverse=True):
            if batch < inputs.batch_size and inputs.batch_size % batch == 0:
                out.append((_micro_batch_label(inputs, batch), {
                    "batch_size": batch,
                    "gradient_accumulation_steps": inputs.gradient_accumulation_steps * inputs.batch_size // batch,
                }))
    if inputs.world_size > 1 and inputs.shard in ("ddp", "zero1", "zero2"):
        out.append(("ZeRO-3 / FSDP full shard", {"shard": "zero3"}))
    if inputs.world_size > 1 and inputs.shard in ("zero2", "zero3", "fsdp") and inputs.offload == "none":
        out.append(("CPU offload of optimizer states", {"offload": "optimizer"}))
    if inputs.world_size == 1 and not inputs.is_peft and inputs.offload == "none":
        # DeepSpeed ZeRO-Offload: optimizer states and step on the CPU, full fine-tuning kept on one GPU
        out.append(("CPU offload of optimizer states (ZeRO-Offload)", {"shard": "zero2", "offload": "optimizer"}))
        if not inputs.gradient_checkpointing:
            out.append(("ZeRO-Offload + gradient checkpointing",
                        {"shard": "zero2", "offload": "optimizer", "gradient_checkpointing": True}))
    return out


def _key(s: Suggestion) -> tuple[bool, int]:
    return (not s.fits, -s.saves_bytes)


def select(result: list[Suggestion], is_peft: bool, limit: int) -> list[Suggestion]:
    """The suggestions shown, from every candidate that saves memory (in candidate order): largest saving
    first, those that fit first; a full fine-tune also keeps up to ``KEEP_FULL`` ways that stay full."""
    result = sorted(result, key=_key)
    chosen = result[:limit]
    if is_peft:
        return chosen
    # Ways that keep full fine-tuning (its quality ceiling) are shown even when adapters save more.
    keeping = [s for s in result if "method" not in s.changes and s not in chosen][:KEEP_FULL]
    kept_already = sum("method" not in s.changes for s in chosen)
    extra = keeping[:max(0, KEEP_FULL - kept_already)]
    if extra:
        chosen = chosen[:limit - len(extra)] + extra
        chosen.sort(key=_key)
    return chosen


def suggest(spec: ModelSpec, plan: Plan, limit: int = 6) -> list[Suggestion]:
    """Changes that lower the peak, largest saving first; those that make it fit come first.

    A candidate's reserved peak needs the allocator replay, most of a plan's time; its allocated peak does
    not. The replay's slack is never negative, so the allocated peak bounds what a candidate can save and
    whether it can fit: candidates are replayed best bound first, and one whose bound cannot reach the list
    is never replayed. The list is the one :func:`select` gives from every candidate replayed."""
    found: list[tuple[str, dict[str, object]]] = []
    for label, wanted in _candidates(plan.inputs):
        changes = {k: v for k, v in wanted.items() if getattr(plan.inputs, k) != v}
        if changes and changes not in [c for _, c in found]:  # not already so, nor the same change renamed
            found.append((label, changes))
    alternatives = [plan.inputs.replace(**changes) for _, changes in found]
    bounds = [estimate(spec, alt, plan.budget_bytes, slack=False) for alt in alternatives]
    exact: dict[int, Suggestion | None] = {}

    def optimistic(i: int) -> tuple[bool, int]:
        return (bounds[i].fits is not True, bounds[i].peak_bytes - plan.peak_bytes)

    def evaluate(i: int) -> Suggestion | None:
        if i not in exact:
            alt = estimate(spec, alternatives[i], plan.budget_bytes, plan.budget_label)
            saves = plan.peak_bytes - alt.peak_bytes
            exact[i] = Suggestion(found[i][0], found[i][1], alt.peak_bytes, saves, alt.fits) if saves > 0 else None
        return exact[i]

    def top(indices: list[int], k: int) -> list[Suggestion]:
        best: list[Suggestion] = []
        for i in sorted((i for i in indices if optimistic(i)[1] < 0), key=optimistic):  # bound saves memory
            if len(best) >= k and optimistic(i) > _key(best[k - 1]):
                break  # this bound, and every later one, cannot reach the first k
            suggestion = evaluate(i)
            if suggestion is not None:
                best = sorted([*best, suggestion], key=_key)
        return best[:k]

    def replayed() -> list[Suggestion]:
        return [s for _, s in sorted(exact.items()) if s is not None]

    top(list(range(len(found))), limit)
    if not plan.inputs.is_peft:
        chosen = sorted(replayed(), key=_key)[:limit]  # as select() orders them: ties in candidate order
        full = [i for i, (_, changes) in enumerate(found) if "method" not in changes]
        need = KEEP_FULL - sum("method" not in s.changes for s in chosen)
        if need > 0:
            top([i for i in full if exact.get(i) not in chosen], need)
    return select(replayed(), plan.inputs.is_peft, limit)


@dataclass(frozen=True)
class FitRow:
    """For one method: the largest micro-batch at the plan's sequence length, and the longest sequence at its batch."""

    method: str
    gradient_checkpointing: bool
    max_batch_size: int
    max_seq_len: int


def _largest(fits: Callable[[int], bool], ceiling: int) -> int:
    """Largest n in [1, ceiling] with fits(n), assuming monotonicity; 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo, hi = 1, 1
    while hi < ceiling and fits(min(hi * 2, ceiling)):
        hi = min(hi * 2, ceiling)
        lo = hi
    if hi == ceiling:
        return ceiling
    hi = min(hi * 2, ceiling)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def what_fits(spec: ModelSpec, inputs: PlanInputs, budget_bytes: int, max_batch: int = 1024,
              max_seq: int | None = None) -> list[FitRow]:
    """For each method with and without checkpointing, the largest batch and sequence length that fit."""
    seq_cap = max_seq or max(spec.max_position or 0, inputs.seq_len, 2048)
    rows = []
    for method in METHODS:
        for gc in (False, True):
            base = inputs.replace(method=method, gradient_checkpointing=gc)

            def fits_batch(b: int, base: PlanInputs = base) -> bool:
                return estimate(spec, base.replace(batch_size=b)).peak_bytes <= budget_bytes

            def fits_seq(s: int, base: PlanInputs = base) -> bool:
                return estimate(spec, base.replace(seq_len=s)).peak_bytes <= budget_bytes

            rows.append(FitRow(method, gc, _largest(fits_batch, max_batch), _largest(fits_seq, seq_cap)))
    return rows
