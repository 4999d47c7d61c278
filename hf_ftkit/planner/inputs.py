"""The configuration a plan describes: one dataclass, readable by ``HfArgumentParser``."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from hf_ftkit._data import load
from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.methods import MethodInfo, method_info, method_names

Precision = Literal["fp32", "bf16", "bf16-mixed", "fp16-mixed"]
Shard = Literal["none", "ddp", "fsdp", "zero1", "zero2", "zero3"]
FsdpStrategy = Literal["full_shard", "shard_grad_op", "hybrid_shard"]
Offload = Literal["none", "optimizer", "params"]
AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]

METHODS = method_names()  # from the method table, data/methods.json
PRECISIONS = ("fp32", "bf16", "bf16-mixed", "fp16-mixed")
SHARDS = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")
FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard")
OFFLOADS = ("none", "optimizer", "params")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
QUANT_TYPES = ("nf4", "fp4")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BadInputError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}{hint}.")


@dataclass
class PlanInputs:
    """Everything that decides a fine-tuning run's memory, with Trainer/PEFT/bitsandbytes defaults."""

    method: str = field(default="full", metadata={"help": f"{', '.join(METHODS)} (the method table).",
                                                  "choices": METHODS})
    batch_size: int = field(default=1, metadata={"help": "Micro-batch per device (per_device_train_batch_size)."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sequence (max_length)."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step: earlier ones' gradients stay alive through the next."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "TrainingArguments.optim name."})
    precision: Precision = field(
        default="bf16-mixed",
        metadata={"help": "fp32, bf16 (weights and optimizer states in bf16), bf16-mixed or fp16-mixed."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_targets: str = field(default="all-linear", metadata={"help": "'all-linear' or a comma-separated list."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (>0 keeps a dropout mask)."})
    adapter_dtype: str = field(default="fp32", metadata={
        "help": "dtype of the LoRA weights: fp32 (PEFT's default, autocast_adapter_dtype=True) or bf16/fp16 "
                "(autocast_adapter_dtype=False; TRL's SFTTrainer casts a 4-bit base's adapters to bf16).",
        "choices": ("fp32", "bf16", "fp16")})
    modules_to_save: tuple[str, ...] = field(default=(), metadata={"help": "Fully trained modules (PEFT)."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type.", "choices": QUANT_TYPES})
    double_quant: bool = field(default=True, metadata={"help": "bnb_4bit_use_double_quant."})
    compute_dtype: str = field(default="bf16", metadata={"help": "bnb_4bit_compute_dtype.",
                                                         "choices": ("bf16", "fp16", "fp32")})
    quant_storage: str = field(default="uint8", metadata={"help": "bnb_4bit_quant_storage (bf16 for FSDP).",
                                                          "choices": ("uint8", "bf16", "fp16", "fp32")})
    kbit_upcast: bool = field(
        default=False, metadata={"help": "prepare_model_for_kbit_training's fp32 upcast of non-quantized weights."}
    )
    gpus: int = field(default=1, metadata={"help": "GPUs per node."})
    nodes: int = field(default=1, metadata={"help": "Nodes."})
    shard: Shard = field(default="none", metadata={"help": "none, ddp, fsdp, zero1, zero2, zero3."})
    fsdp_strategy: FsdpStrategy = field(default="full_shard", metadata={"help": "FSDP sharding strategy."})
    offload: Offload = field(default="none", metadata={"help": "CPU offload: none, optimizer, params."})
    attn_implementation: AttnImpl = field(default="sdpa", metadata={"help": "sdpa, flash_attention_2, eager."})
    packing: bool = field(default=False, metadata={
        "help": "TRL packing (BFD): each micro-batch runs as one padding-free row of packed sequences (no padding; "
                "SDPA and eager attention get a mask over the row, flash attention none)."})
    padding_free: bool = field(default=False, metadata={
        "help": "TRL padding-free batches: the micro-batch's sequences run as one row (no padding; SDPA and eager "
                "attention get a mask over the row, flash attention none)."})
    activation_offloading: bool = field(default=False, metadata={
        "help": "Activations offloaded to host memory (with gradient checkpointing: the checkpointed inputs): "
                "TRL's activation_offloading, or gradient_checkpointing_kwargs offload."})
    use_liger_kernel: bool = field(default=False, metadata={"help": "Liger kernels incl. fused linear CE."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``BadInputError`` naming the first invalid field and its fix."""
        _choice("method", self.method, METHODS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("shard", self.shard, SHARDS)
        _choice("fsdp_strategy", self.fsdp_strategy, FSDP_STRATEGIES)
        _choice("offload", self.offload, OFFLOADS)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLS)
        _choice("quant_type", self.quant_type, QUANT_TYPES)
        _choice("adapter_dtype", self.adapter_dtype, ("fp32", "bf16", "fp16"))
        _choice("optim", self.optim, tuple(sorted(load("optimizers")["optimizers"])))
        for name in ("batch_size", "seq_len", "gradient_accumulation_steps", "lora_r", "gpus", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise BadInputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.shard == "none" and self.world_size > 1:
            raise BadInputError(
                f"{self.world_size} GPUs need a --shard strategy (ddp, fsdp, zero1/2/3); pass one or use --gpus 1."
            )
        if self.offload != "none" and self.shard not in ("fsdp", "zero1", "zero2", "zero3"):
            raise BadInputError("--offload needs --shard fsdp or zero1/zero2/zero3; CPU offload is a sharding feature.")
        if self.offload == "params" and self.shard not in ("fsdp", "zero3"):
            raise BadInputError("--offload params needs --shard fsdp or zero3, which shard the parameters.")
        if not self.lora_targets.strip():
            raise BadInputError("--lora-targets is empty; pass all-linear or module names like q_proj,v_proj.")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def info(self) -> MethodInfo:
        """The method's entry in the method table."""
        return method_info(self.method)

    @property
    def is_peft(self) -> bool:
        """A PEFT adapter on a frozen base (every method but full fine-tuning)."""
        return self.info.is_peft

    @property
    def quantized_base(self) -> bool:
        """The base is held in bitsandbytes 4-bit (QLoRA, QDoRA)."""
        return self.info.quantized_base

    @property
    def dora(self) -> bool:
        """The adapter is DoRA (weight-decomposed: a magnitude per output beside A and B)."""
        return self.info.dora

    @property
    def weight_dtype(self) -> str:
        """The dtype the model is loaded in: fp32 for fp32 runs and for full FT's fp32 master weights."""
        if not self.is_peft and self.precision.endswith("-mixed"):
            return "fp32"
        return self.compute_dtype_name

    @property
    def autocast(self) -> bool:
        """The step runs under autocast. ``bf16`` with an adapter is a run without it (Trainer's flags off over a
        model loaded in bf16, as ``plan_from_training`` maps it, or a custom loop), over a 16-bit base or a 4-bit one
        alike: PEFT then runs its adapters on a copy of each target's input in ``adapter_dtype`` (fp32 by default;
        before PEFT 0.18 also under ``autocast_adapter_dtype=False`` when a 4-bit base stores its weights in uint8,
        huggingface/peft#2893), where that is not bf16. Full fine-tuning is planned under autocast whatever the
        precision (Trainer autocasts whenever a flag is on)."""
        if self.precision == "fp32":
            return False
        return not (self.is_peft and self.precision == "bf16")

    @property
    def compute_dtype_name(self) -> str:
        """The dtype the step computes in: fp32, or the autocast/16-bit dtype (the one rule; ``weight_dtype``,
        ``activations.compute_bytes`` and the tracer's autocast derive from it)."""
        if self.precision == "fp32" or (self.quantized_base and self.kbit_upcast and not self.autocast):
            return "fp32"  # prepare_model_for_kbit_training left every unquantized weight fp32, and nothing autocasts
        return "fp16" if self.precision == "fp16-mixed" else "bf16"

    @property
    def distinct_micro_batches(self) -> int:
        """The micro-batches of an optimizer step whose memory differs: the first (no gradient exists yet) and, with
        accumulation, the second (the first's gradients stay, and its backward adds into them). Every later one
        repeats the second, so the tracer and the allocator model run these alone."""
        return min(self.gradient_accumulation_steps, 2)

    @property
    def adapter_param_bytes(self) -> int:
        """Bytes per element of the adapter weights (``adapter_dtype``), and of their gradients."""
        return 4 if self.adapter_dtype == "fp32" else 2

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of the weights as loaded (``weight_dtype``)."""
        return 4 if self.weight_dtype == "fp32" else 2

    def target_names(self) -> list[str] | None:
        """LoRA target module names, or None for ``all-linear``.

        Full module paths (what PEFT leaves in ``target_modules`` once a model is wrapped, e.g.
        ``model.layers.0.self_attn.q_proj``) count as their last part: a path naming some layers only is
        planned as every layer, which errs on the safe side."""
        if self.lora_targets.strip() == "all-linear":
            return None
        names = (t.strip().rsplit(".", 1)[-1] for t in self.lora_targets.split(",") if t.strip())
        return list(dict.fromkeys(names))

    def replace(self, **changes: Any) -> PlanInputs:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules_to_save"] = list(self.modules_to_save)
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
