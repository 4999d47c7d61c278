"""Measured vs planned GPU memory: a few real training steps per configuration on CUDA.

Models are built from catalog configs with random weights (no download). For each configuration
it runs three optimizer steps the way Trainer does (autocast, its optimizer class, LoRA via PEFT,
4-bit via bitsandbytes), resets the peak after the first step, and prints
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` beside the plan. Writes
``docs/benchmarks/gpu_check.md``.

    python benchmarks/gpu_check.py            # needs a CUDA GPU; ~2-4 minutes on an H100/H200
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

from hf_ftkit._compat import enable_checkpointing
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
CONFIGS = [
    ("Qwen/Qwen2.5-0.5B", dict(method="full", batch_size=4, seq_len=1024)),
    ("Qwen/Qwen2.5-0.5B", dict(method="full", batch_size=4, seq_len=1024, gradient_checkpointing=True)),
    ("meta-llama/Llama-3.2-1B", dict(method="lora", batch_size=4, seq_len=1024)),
    ("meta-llama/Llama-3.2-1B", dict(method="qlora", batch_size=4, seq_len=1024, gradient_checkpointing=True)),
    ("meta-llama/Llama-3.2-3B", dict(method="qlora", batch_size=2, seq_len=2048)),
    ("meta-llama/Llama-3.2-1B", dict(method="full", batch_size=2, seq_len=2048, optim="adamw_torch")),
]


def _load(model_id: str, inputs: PlanInputs, workdir: Path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    spec = resolve_model(model_id)
    from hf_ftkit.planner.structure import config_from_dict

    config = config_from_dict(dict(spec.config))
    config._attn_implementation = inputs.attn_implementation
    full_mixed = inputs.method == "full" and inputs.precision.endswith("-mixed")
    dtype = torch.float32 if full_mixed or inputs.precision == "fp32" else torch.bfloat16
    if inputs.method == "qlora":
        path = workdir / model_id.replace("/", "__")
        if not path.exists():
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=inputs.quant_type,
                                 bnb_4bit_use_double_quant=inputs.double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0}, attn_implementation=inputs.attn_implementation)
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if inputs.gradient_checkpointing:
        enable_checkpointing(model)
    if inputs.is_peft:
        from peft import LoraConfig, get_peft_model

        if inputs.gradient_checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(r=inputs.lora_r, lora_alpha=2 * inputs.lora_r, lora_dropout=inputs.lora_dropout,
                          target_modules=inputs.target_names() or "all-linear", use_dora=inputs.method == "dora")
        model = get_peft_model(model, lora)
    model.train()
    return model


def measure(model_id: str, inputs: PlanInputs, workdir: Path) -> tuple[int, int]:
    import torch
    from transformers import Trainer, TrainingArguments

    model = _load(model_id, inputs, workdir)
    args = TrainingArguments(output_dir=str(workdir / "out"), optim=inputs.optim, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    ids = torch.randint(0, 1000, (inputs.batch_size, inputs.seq_len), device="cuda")
    for step in range(3):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=inputs.precision != "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    result = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none found.", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_id, kw in CONFIGS:
            inputs = PlanInputs(**kw)
            plan = estimate(resolve_model(model_id), inputs)
            start = time.perf_counter()
            allocated, reserved = measure(model_id, inputs, Path(tmp))
            rows.append((model_id, kw, plan.allocated_peak_bytes, allocated, plan.peak_bytes, reserved,
                         time.perf_counter() - start))
            print(rows[-1], flush=True)
    lines = [f"# GPU check ({torch.cuda.get_device_name(0)})", "",
             "Generated by `python benchmarks/gpu_check.py`: three real optimizer steps per row; peaks from step 2.",
             "", "| model | config | planned alloc GiB | max_allocated GiB | error | planned peak GiB | "
             "max_reserved GiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for model_id, kw, p_alloc, alloc, p_peak, reserved, _ in rows:
        lines.append(f"| {model_id} | {kw} | {p_alloc / 2**30:.2f} | {alloc / 2**30:.2f} | "
                     f"{100 * (p_alloc - alloc) / alloc:+.1f}% | {p_peak / 2**30:.2f} | {reserved / 2**30:.2f} |")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
