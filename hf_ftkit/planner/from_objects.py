"""Plan from the objects a training script already has: model, TrainingArguments/SFTConfig,
LoraConfig and BitsAndBytesConfig. Each object's own defaults are respected (``SFTConfig`` turns
gradient checkpointing and bf16 on; ``TrainingArguments`` does not)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_ftkit._dtypes import from_torch
from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.estimate import Plan
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.methods import MethodInfo, method_info, quantized_twin
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.spec import ModelSpec


def _spec_of(model: Any) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str | Path):
        return resolve_model(str(model))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        raise BadInputError("model has no .config; pass a transformers model, a hub id or a config path.")
    from hf_ftkit.planner.structure import spec_from_config

    name = getattr(config, "_name_or_path", "") or config.model_type
    return spec_from_config(config, name)


def plan_precision(method: str, bf16: bool, fp16: bool, loaded: str | None) -> str:
    """The plan's ``precision`` from Trainer/TRL's ``bf16``/``fp16`` flags and the dtype the model is loaded in
    (``bf16``, ``fp16``, ``fp32``; None when unknown). The one rule for ``plan_from_training`` and recipes.

    Full fine-tuning of a half-precision model keeps weights and optimizer states in it (``bf16``); of an fp32
    model under a flag, fp32 master weights with autocast (``*-mixed``). An adapter over a 16-bit base computes
    under the flag's autocast (``*-mixed``) or in the base's dtype; over an fp32 base the plan is ``fp32``
    (the weights are fp32; activations are then over-counted, the safe side). A 4-bit base follows the flag.
    """
    mixed = "bf16" if bf16 else ("fp16" if fp16 else None)
    half = loaded in ("bf16", "fp16")
    info = method_info(method)
    if not info.is_peft:
        return "bf16" if half else (f"{mixed}-mixed" if mixed else "fp32")
    if info.quantized_base:
        return f"{mixed}-mixed" if mixed else ("bf16" if half else "fp32")
    if not half and loaded is not None:
        return "fp32"
    return f"{mixed}-mixed" if mixed else ("bf16" if half else "fp32")


def _model_dtype(model: Any) -> str | None:
    dtype = getattr(model, "dtype", None)
    return from_torch(dtype) if dtype is not None else None


def attention_name(value: Any) -> str | None:
    """The planner's ``attn_implementation`` for transformers' own value (None when unset): ``eager`` keeps the
    S x S attention weights; the flash kernels (``flash_attention_2``/``_3``, hub kernels) and sdpa, flex and the
    rest do not, and are planned as flash or sdpa."""
    if not value:
        return None
    text = str(value)
    if text == "eager":
        return "eager"
    return "flash_attention_2" if "flash" in text else "sdpa"


def _attention(model: Any, args: Any) -> str | None:
    """The attention a model object runs with (``config._attn_implementation``), or the one the trainer will load
    the model with (``model_init_kwargs``, for a model named by hub id)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    value = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if value is None:
        kwargs = getattr(args, "model_init_kwargs", None)
        value = kwargs.get("attn_implementation") if isinstance(kwargs, Mapping) else None
    return attention_name(value)


def default_lora_targets(model_type: str | None) -> str:
    """The modules PEFT wraps for a ``LoraConfig`` without ``target_modules``: its per-architecture default."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:  # PEFT itself refuses such a config
        raise BadInputError(f"the LoraConfig names no target_modules and PEFT has no default for model type "
                            f"{model_type or 'unknown'}; set target_modules (e.g. 'all-linear').")
    return ",".join(DEFAULTS[model_type])


def _fp32_unquantized(model: Any) -> bool:
    """The model keeps its non-quantized weights in fp32: loaded in fp32, or upcast by
    ``prepare_model_for_kbit_training``. Its input embeddings tell (bitsandbytes never quantizes them)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return str(getattr(getattr(embeddings, "weight", None), "dtype", "")) == "torch.float32"


def _deepspeed(args: Any) -> tuple[str, str]:
    config = getattr(args, "deepspeed", None)
    if not config:
        return "none", "none"
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text())
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = "none"
    if zero.get("offload_param", {}).get("device") in ("cpu", "nvme"):
        offload = "params"
    elif zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
        offload = "optimizer"
    return (f"zero{stage}" if stage else "ddp"), offload


def _fsdp(args: Any) -> tuple[str, str, str] | None:
    setting = getattr(args, "fsdp", None)
    if setting is True:  # transformers v5: fsdp=True, everything else in fsdp_config
        config = getattr(args, "fsdp_config", None) or {}
        strategy = "full_shard" if config.get("reshard_after_forward", True) else "shard_grad_op"
        offload = config.get("cpu_offload") or config.get("offload_params")
        return "fsdp", strategy, "params" if offload else "none"
    if isinstance(setting, str):
        setting = setting.split()
    options = [str(getattr(o, "value", o)) for o in (setting or [])]
    if not options:
        return None
    strategy = "full_shard"
    for name in ("shard_grad_op", "hybrid_shard"):
        if name in options:
            strategy = name
    return "fsdp", strategy, "params" if "offload" in options else "none"


def training_args(args: Any) -> Any:
    """``args`` as an object: a mapping of ``SFTConfig`` fields becomes an ``SFTConfig`` built with
    ``use_cpu=True``, so that planning a bf16 GPU run does not need the GPU (``TrainingArguments`` refuses bf16
    on a machine without one); ``use_cpu`` changes nothing in the plan."""
    if not isinstance(args, Mapping):
        return args
    from trl import SFTConfig

    try:
        with warnings.catch_warnings():  # TRL's own defaults use names transformers v5 renamed
            warnings.simplefilter("ignore", FutureWarning)
            return SFTConfig(**{"use_cpu": True, "report_to": "none", **args})
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"the training arguments are not valid SFTConfig fields ({reason}); fix them.") from None


def inputs_from_training(
    args: Any = None, lora_config: Any = None, bnb_config: Any = None, model: Any = None,
    seq_len: int | None = None, world_size: int | None = None, model_type: str | None = None,
) -> PlanInputs:
    """A ``PlanInputs`` describing exactly the run these objects configure (``model_type`` picks PEFT's default
    targets for a ``LoraConfig`` without ``target_modules``; read from ``model.config`` when not given)."""
    args = training_args(args)
    values: dict[str, Any] = {}
    method = "full"
    if lora_config is not None:
        method = "dora" if getattr(lora_config, "use_dora", False) else "lora"
        targets = lora_config.target_modules
        if not targets:
            model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
            values["lora_targets"] = default_lora_targets(model_type)
        else:
            values["lora_targets"] = targets if isinstance(targets, str) else ",".join(sorted(targets))
        values["lora_r"] = int(lora_config.r)
        values["lora_dropout"] = float(lora_config.lora_dropout)
        values["modules_to_save"] = tuple(lora_config.modules_to_save or ())
    if bnb_config is not None and getattr(bnb_config, "load_in_4bit", False):
        if lora_config is None:
            raise BadInputError(
                "a 4-bit BitsAndBytesConfig needs a LoraConfig: a quantized base cannot be fully trained."
            )
        method = quantized_twin(method_info(method).adapter or "lora").name  # QLoRA, or QDoRA for use_dora
        values["quant_type"] = bnb_config.bnb_4bit_quant_type
        values["double_quant"] = bool(bnb_config.bnb_4bit_use_double_quant)
        values["compute_dtype"] = from_torch(bnb_config.bnb_4bit_compute_dtype) or "fp32"
        values["quant_storage"] = from_torch(bnb_config.bnb_4bit_quant_storage) or "uint8"
        values["kbit_upcast"] = _fp32_unquantized(model)
    values["method"] = method
    if args is not None:
        values["batch_size"] = int(args.per_device_train_batch_size)
        values["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
        values["gradient_checkpointing"] = bool(
            getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        )
        values["optim"] = str(getattr(args.optim, "value", args.optim))
        values["precision"] = plan_precision(method, bool(args.bf16), bool(args.fp16), _model_dtype(model))
        # TRL's BFD packing runs padding-free rows; its "wrapped" strategy cuts full-length rows that hold no padding,
        # which the plan has no input for: planned as a padded batch (a mask it does not get), leaning to more
        wrapped = getattr(args, "packing_strategy", "bfd") == "wrapped"
        values["packing"] = bool(getattr(args, "packing", False)) and not wrapped
        values["padding_free"] = bool(getattr(args, "padding_free", False))
        values["use_liger_kernel"] = bool(getattr(args, "use_liger_kernel", False))
        gc_kwargs = (getattr(args, "activation_checkpointing_kwargs", None)
                     or getattr(args, "gradient_checkpointing_kwargs", None) or {})
        # TRL's activation_offloading, or transformers' checkpointing with offload (both move the
        # checkpointed inputs to host memory)
        values["activation_offloading"] = bool(getattr(args, "activation_offloading", False)
                                               or (isinstance(gc_kwargs, dict) and gc_kwargs.get("offload")))
        seq_len = seq_len or getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
        sharding = _fsdp(args)
        if sharding:
            values["shard"], values["fsdp_strategy"], values["offload"] = sharding
        else:
            values["shard"], values["offload"] = _deepspeed(args)
        world = world_size or int(getattr(args, "world_size", 1) or 1)
        values["gpus"] = world
        if values["shard"] == "none" and world > 1:
            values["shard"] = "ddp"
    if seq_len:
        values["seq_len"] = int(seq_len)
    attention = _attention(model, args)
    if attention:
        values["attn_implementation"] = attention
    if method != "full":
        values["adapter_dtype"] = _adapter_dtype(model, args, values.get("shard", "none"), method_info(method))
    return PlanInputs(**values)


def _adapter_dtype(model: Any, args: Any, shard: str, info: MethodInfo) -> str:
    """The LoRA weights' dtype: a PeftModel's own; else what the trainer will make of them. PEFT keeps them in fp32
    (``autocast_adapter_dtype``); TRL's trainers cast a 4-bit base's adapters to bf16, and under DeepSpeed ZeRO-3
    create them in the base's dtype (``autocast_adapter_dtype=False``)."""
    named = getattr(model, "named_parameters", None)
    if callable(named):
        for name, param in named():
            if "lora_A" in name:
                return from_torch(param.dtype) or "fp32"
    if type(args).__module__.split(".")[0] == "trl":
        if info.quantized_base:
            return "bf16"
        if shard == "zero3":
            return _model_dtype(model) or "bf16"
    return "fp32"


def plan_from_training(
    model: Any,
    args: Any = None,
    lora_config: Any = None,
    bnb_config: Any = None,
    *,
    seq_len: int | None = None,
    budget: str | int | None = None,
    world_size: int | None = None,
) -> Plan:
    """Plan the run that ``Trainer``/``SFTTrainer`` would do with these objects.

    Args:
        model: a transformers model (or PeftModel), a hub id or a config path.
        args: ``TrainingArguments`` or ``SFTConfig``, or a dict of ``SFTConfig`` fields (plans a GPU run on a
            machine without one, where ``SFTConfig(bf16=True)`` itself refuses to be built).
        lora_config: ``peft.LoraConfig``, if training adapters.
        bnb_config: ``transformers.BitsAndBytesConfig``, if the base is quantized.
        seq_len: tokens per sequence; defaults to ``args.max_length`` (SFTConfig) or 2048.
        budget: as for :func:`hf_ftkit.plan`.

    Example:
        >>> from trl import SFTConfig
        >>> from peft import LoraConfig
        >>> p = plan_from_training("meta-llama/Llama-3.1-8B", {"per_device_train_batch_size": 4, "max_length": 2048},
        ...                        LoraConfig(r=16, target_modules="all-linear"), budget="24GiB")
    """
    spec = _spec_of(model)
    inputs = inputs_from_training(args, lora_config, bnb_config, model, seq_len, world_size, spec.model_type)
    return plan(spec, inputs, budget=budget)
