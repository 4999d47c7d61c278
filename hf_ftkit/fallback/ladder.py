"""The fallback ladder: from highest expected quality to lowest memory, the first rung that fits.

    full (mixed precision) -> full (bf16 + 8-bit optimizer) -> LoRA -> LoRA + checkpointing
    -> QLoRA NF4 + checkpointing -> QLoRA + double quant + paged 8-bit optimizer
    -> the same with smaller micro-batches and more accumulation (same effective batch)

The rungs are the method table's (``data/methods.json``); DoRA and QDoRA rungs join when the user names
those methods (``LadderLimits(methods=("dora", "qdora"))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_ftkit._data import load
from hf_ftkit._dtypes import to_torch
from hf_ftkit.errors import BadInputError, DoesNotFitError
from hf_ftkit.planner.budget import parse_budget
from hf_ftkit.planner.estimate import Plan, comm_buffer_bytes, estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.methods import all_rungs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.spec import ModelSpec
from hf_ftkit.units import GIB, format_bytes


@dataclass(frozen=True)
class LadderLimits:
    """Restrictions on the ladder.

    Attributes:
        allow_full: allow full fine-tuning rungs.
        min_lora_r: never plan adapters below this rank (the user's rank is raised to it).
        fixed_micro_batch: never shrink the micro-batch.
        methods: the only methods allowed (None: all).
    """

    allow_full: bool = True
    min_lora_r: int | None = None
    fixed_micro_batch: bool = False
    methods: tuple[str, ...] | None = None

    def allows(self, inputs: PlanInputs) -> bool:
        if not inputs.is_peft and not self.allow_full:
            return False
        return self.methods is None or inputs.method in self.methods


@dataclass(frozen=True)
class Rung:
    """One rung: its name, the configuration, its plan and the verdict."""

    name: str
    inputs: PlanInputs
    peak_bytes: int
    fits: bool
    reason: str


@dataclass
class Setup:
    """The chosen rung, and every rung considered with why it was accepted or rejected."""

    model: ModelSpec
    plan: Plan
    name: str
    budget_bytes: int
    ladder: list[Rung] = field(default_factory=list)

    @property
    def inputs(self) -> PlanInputs:
        return self.plan.inputs

    def chosen_dict(self) -> dict[str, Any]:
        i = self.inputs
        return {"rung": self.name, "method": i.method, "gradient_checkpointing": i.gradient_checkpointing,
                "optim": i.optim, "precision": i.precision, "batch_size": i.batch_size,
                "gradient_accumulation_steps": i.gradient_accumulation_steps, "lora_r": i.lora_r}

    def training_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``TrainingArguments`` / ``SFTConfig`` that realise this setup."""
        from hf_ftkit._compat import checkpointing_args

        i = self.inputs
        return {
            "optim": i.optim,
            "per_device_train_batch_size": i.batch_size,
            "gradient_accumulation_steps": i.gradient_accumulation_steps,
            **checkpointing_args(i.gradient_checkpointing),
            "bf16": i.precision.startswith("bf16"),
            "fp16": i.precision == "fp16-mixed",
        }

    def lora_config(self) -> Any:
        """A ``peft.LoraConfig`` for adapter rungs, ``None`` for full fine-tuning."""
        i = self.inputs
        if not i.is_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(r=i.lora_r, lora_alpha=2 * i.lora_r, lora_dropout=i.lora_dropout,
                          target_modules=i.target_names() or "all-linear", use_dora=i.dora,
                          modules_to_save=list(i.modules_to_save) or None, task_type="CAUSAL_LM")

    def bnb_config(self) -> Any:
        """A ``BitsAndBytesConfig`` for QLoRA rungs (storage dtype matched for FSDP/ZeRO-3), else ``None``."""
        i = self.inputs
        if not i.quantized_base:
            return None
        from transformers import BitsAndBytesConfig

        storage = "bf16" if i.shard in ("fsdp", "zero3") and i.quant_storage == "uint8" else i.quant_storage
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=i.quant_type,
                                  bnb_4bit_use_double_quant=i.double_quant,
                                  bnb_4bit_compute_dtype=to_torch(i.compute_dtype),
                                  bnb_4bit_quant_storage=to_torch(storage))


    def load_model(self, model_path: str | None = None, **kwargs: Any) -> Any:
        """Load the model the way this setup trains it.

        4-bit through bitsandbytes for QLoRA (the base frozen, without
        ``prepare_model_for_kbit_training``'s fp32 upcasts that cost memory), non-reentrant
        checkpointing with ``enable_input_require_grads`` when the base is frozen, and the LoRA
        adapters from :meth:`lora_config`.

        Args:
            model_path: a hub id or checkpoint directory; defaults to the planned model's id.
            **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.
        """
        from transformers import AutoModelForCausalLM

        from hf_ftkit._compat import enable_checkpointing

        i = self.inputs
        if i.attn_implementation != "sdpa":
            kwargs.setdefault("attn_implementation", i.attn_implementation)
        kwargs.setdefault("trust_remote_code", False)  # never run or prompt for custom code unless asked
        model = AutoModelForCausalLM.from_pretrained(
            model_path or self.model.model_id, dtype=to_torch(i.weight_dtype),
            quantization_config=self.bnb_config(), **kwargs
        )
        if i.is_peft:
            model.requires_grad_(False)
        if i.gradient_checkpointing:
            enable_checkpointing(model)
            if i.is_peft:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        if i.is_peft:
            from peft import get_peft_model

            model = get_peft_model(model, self.lora_config())
        return model


def ladder_rungs(inputs: PlanInputs, limits: LadderLimits) -> list[tuple[str, PlanInputs]]:
    """Every rung allowed by ``limits``, in order, built on the user's own settings."""
    rank = max(inputs.lora_r, limits.min_lora_r or 0)
    # the rungs come from the method table; a rung marked non-default (DoRA, QDoRA) is on the ladder only
    # when the user names the methods allowed
    chosen = [r for r in all_rungs() if r.default or (limits.methods is not None and r.method in limits.methods)]
    rungs = [(r.name, inputs.replace(method=r.method, lora_r=rank, **dict(r.changes))) for r in chosen]
    rungs = [(name, r) for name, r in rungs if limits.allows(r)]
    if rungs and not limits.fixed_micro_batch:
        name, last = rungs[-1]
        effective = last.batch_size * last.gradient_accumulation_steps
        batch = last.batch_size // 2
        while batch >= 1:
            if effective % batch == 0:
                rungs.append((f"{name}, micro-batch {batch} x accumulation {effective // batch}",
                              last.replace(batch_size=batch, gradient_accumulation_steps=effective // batch)))
            batch //= 2
    return rungs


def choose_setup(
    model: str | ModelSpec,
    budget: str | int,
    inputs: PlanInputs | None = None,
    limits: LadderLimits | None = None,
    **overrides: Any,
) -> Setup:
    """Walk the ladder and return the first rung whose plan fits ``budget``.

    Raises:
        BadInputError: the budget is below the fixed per-device overhead, or the limits leave no rung.
        DoesNotFitError: no rung fits; the message names the smallest and how much it is short.

    Example:
        >>> setup = choose_setup("meta-llama/Llama-3.1-8B", "24GiB", seq_len=2048)
        >>> setup.inputs.method, setup.training_overrides()["optim"]
    """
    spec = model if isinstance(model, ModelSpec) else resolve_model(str(model))
    base = (inputs or PlanInputs()).replace(**overrides) if overrides else (inputs or PlanInputs())
    resolved = parse_budget(budget)
    limits = limits or LadderLimits()
    fixed = int(load("constants")["cuda_context_bytes"]) + comm_buffer_bytes(base)
    if resolved.bytes <= fixed:
        raise BadInputError(
            f"--budget {resolved.label} is below the fixed per-device overhead of {format_bytes(fixed)}; "
            "pass a larger budget."
        )
    rungs = ladder_rungs(base, limits)
    if not rungs:
        raise BadInputError("the ladder restrictions leave no rung; allow full fine-tuning or more methods.")
    considered: list[Rung] = []
    chosen: tuple[str, Plan] | None = None
    for name, rung_inputs in rungs:
        p = estimate(spec, rung_inputs, resolved.bytes, resolved.label)
        if chosen is None and p.fits:
            chosen = (name, p)
            reason = f"fits with {format_bytes(p.headroom_bytes or 0)} headroom"
        elif chosen is None:
            reason = f"needs {format_bytes(p.peak_bytes)}, {format_bytes(-(p.headroom_bytes or 0))} over budget"
        else:
            reason = "not needed: an earlier rung fits"
        considered.append(Rung(name, rung_inputs, p.peak_bytes, bool(p.fits), reason))
    if chosen is None:
        smallest = min(considered, key=lambda r: r.peak_bytes)
        short = (smallest.peak_bytes - resolved.bytes) / GIB
        raise DoesNotFitError(
            f"nothing fits {resolved.label}: the smallest setup ({smallest.name}) needs "
            f"{format_bytes(smallest.peak_bytes)}, {short:.2f} GiB short; use more GPUs, a shorter --seq-len or a "
            "smaller model."
        )
    return Setup(model=spec, plan=chosen[1], name=chosen[0], budget_bytes=resolved.bytes, ladder=considered)
