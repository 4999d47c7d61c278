"""hf-ftkit's own recipe keys: one dataclass that ``trl.TrlParser`` reads beside TRL's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.budget import find_gpu, known_gpus
from hf_ftkit.planner.methods import method_names

RECIPE_METHODS = (*method_names(), "auto")
RECIPE_SHARDS = ("none", "ddp", "fsdp", "zero2", "zero3")
ACTIONS = ("warn", "stop")
_HARDWARE = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(?:(\d+)\s*x\s*)?([A-Za-z0-9][A-Za-z0-9 _.-]*?)\s*$")


@dataclass
class FtkitArguments:
    """Recipe keys of hf-ftkit; everything else in a recipe is a TRL key."""

    method: str = field(default="lora", metadata={
        "help": "full, lora, dora, qlora, qdora, or auto (the best setup that fits the budget, from the fallback "
                "ladder)."})
    hardware: str | None = field(default=None, metadata={
        "help": "Declared hardware: 'cpu', 'rtx4090', '8x h100' or '2x8x h100' (nodes x GPUs per node x GPU)."})
    budget: str | None = field(default=None, metadata={
        "help": "Per-device memory budget (24GiB, 80G or a GPU name); defaults to the declared GPU's memory."})
    shard: str | None = field(default=None, metadata={
        "help": "How the declared GPUs share the work: none, ddp, fsdp, zero2, zero3 (match your accelerate "
                "config); default ddp on several GPUs."})
    allow_full: bool = field(default=True, metadata={"help": "method auto: may choose full fine-tuning."})
    min_lora_r: int | None = field(default=None, metadata={"help": "method auto: never go below this LoRA rank."})
    fixed_micro_batch: bool = field(default=False, metadata={
        "help": "method auto / fallback: never shrink the micro-batch."})
    fallback: bool = field(default=False, metadata={
        "help": "On a real out-of-memory error, step down the ladder and go on (no checkpoint lost)."})
    max_fallbacks: int = field(default=3, metadata={"help": "Give up after this many fallbacks."})
    forgetting_data: str | None = field(default=None, metadata={
        "help": "Held-out text for ForgettingCallback: a file, a directory, a dataset spec, or 'stdlib' "
                "(Python standard-library docstrings)."})
    forgetting_max_tokens: int = field(default=32768, metadata={"help": "Held-out tokens per measurement."})
    forgetting_every: str = field(default="eval", metadata={"help": "'eval' or a number of steps."})
    forgetting_threshold: str | None = field(default=None, metadata={
        "help": "Limits, e.g. 'bits_per_byte_delta_pct=5,kl=0.1'."})
    forgetting_action: str = field(default="warn", metadata={"help": "warn or stop when a limit is passed."})
    merge: bool = field(default=False, metadata={
        "help": "After training an adapter, merge it into the base (verified) in <output_dir>/merged."})
    merge_dtype: str = field(default="bf16", metadata={"help": "dtype of the merged model: bf16, fp16, fp32."})

    def __post_init__(self) -> None:
        _one_of("method", self.method, RECIPE_METHODS)
        _one_of("forgetting_action", self.forgetting_action, ACTIONS)
        _one_of("merge_dtype", self.merge_dtype, ("bf16", "fp16", "fp32"))
        if self.shard is not None:
            _one_of("shard", self.shard, RECIPE_SHARDS)
        if self.hardware is not None:
            parse_hardware(self.hardware)
        if self.forgetting_every != "eval" and not (self.forgetting_every.isdigit() and int(self.forgetting_every)):
            raise BadInputError(f"forgetting_every: {self.forgetting_every!r} is neither 'eval' nor a positive "
                                "number of steps.")
        self.thresholds()
        for name in ("max_fallbacks", "forgetting_max_tokens"):
            if getattr(self, name) < 0 or (name == "forgetting_max_tokens" and not getattr(self, name)):
                raise BadInputError(f"{name} must be a positive integer.")

    def thresholds(self) -> dict[str, float]:
        """``forgetting_threshold`` as ``{metric: limit}``."""
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in (self.forgetting_threshold or "").split(","))):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise BadInputError(f"forgetting_threshold: {part!r} is not metric=number "
                                    "(e.g. bits_per_byte_delta_pct=5).") from None
        return out


@dataclass(frozen=True)
class Hardware:
    """Declared hardware: ``nodes`` x ``gpus`` per node of ``gpu`` (``None`` for a CPU run)."""

    gpu: str | None
    gpus: int = 1
    nodes: int = 1

    @property
    def label(self) -> str:
        if self.gpu is None:
            return "CPU"
        count = f"{self.nodes}x{self.gpus}x " if self.nodes > 1 else (f"{self.gpus}x " if self.gpus > 1 else "")
        return f"{count}{self.gpu}"


def parse_hardware(text: str) -> Hardware:
    """``'8x h100'`` -> Hardware('h100', gpus=8); ``'cpu'`` -> a CPU run."""
    match = _HARDWARE.match(text)
    if not match:
        raise BadInputError(f"hardware: {text!r} is not like 'rtx4090', '8x h100' or '2x8x h100'.")
    first, second, name = match.groups()
    if name.strip().lower() == "cpu":
        return Hardware(None)
    if find_gpu(name) is None:
        raise BadInputError(f"hardware: unknown GPU {name!r}; known: {', '.join(known_gpus())}.")
    nodes, gpus = (int(first), int(second)) if second else (1, int(first or 1))
    if nodes < 1 or gpus < 1:
        raise BadInputError(f"hardware: {text!r} needs at least one GPU.")
    return Hardware(name.strip().lower(), gpus=gpus, nodes=nodes)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BadInputError(f"{name}: {value!r} is not one of {', '.join(allowed)}.")
