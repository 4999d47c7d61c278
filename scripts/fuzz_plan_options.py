"""Compare `hf-ftkit plan` with `--exact` over seeded random combinations of its options, and report the outliers.

A consistency check, not a benchmark: the plan (formulas, or traced layers outside the validated list) against a
full trace of the same step, for combinations no fixed grid holds (method, precision, optimizer, batch and length,
accumulation, checkpointing, attention, packing, offloading, LoRA rank, targets, dropout, adapter dtype,
modules_to_save, 4-bit type, double quantization, fp32 upcast). Both sides run this project's tracer, so it finds
where the formulas or the layer extrapolation miss what the tracer sees, and where the tracer fails; the
independent references are the published GPU set and DeepSpeed's estimators (`benchmarks/planner_accuracy.py`).

    python scripts/fuzz_plan_options.py             # seed 1, 40 draws, ~10 min on 2 cores
    python scripts/fuzz_plan_options.py 2 50        # seed 2, 50 draws
    python scripts/fuzz_plan_options.py 5 30 microsoft/phi-2,allenai/OLMo-1B-hf   # other models
    python scripts/fuzz_plan_options.py 11 30 --wide  # also long sequences, flash, high ranks, 4-bit dtypes
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MODELS = ("HuggingFaceTB/SmolLM2-360M", "Qwen/Qwen2.5-0.5B", "google/gemma-3-1b-pt", "openai-community/gpt2")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "sgd",
              "paged_adamw_32bit", "lion_8bit", "rmsprop")
FLAG_PCT = 4.0


def draw(rng: random.Random, models: tuple[str, ...] = MODELS) -> tuple[str, dict[str, Any]]:
    model = rng.choice(models)
    method = rng.choice(["full", "lora", "dora", "qlora", "qdora"])
    options: dict[str, Any] = dict(
        method=method, batch_size=rng.choice([1, 2, 4]), seq_len=rng.choice([128, 256, 512]),
        gradient_accumulation_steps=rng.choice([1, 1, 2]), gradient_checkpointing=rng.random() < 0.5,
        optim=rng.choice(OPTIMIZERS), attn_implementation=rng.choice(["sdpa", "sdpa", "eager"]),
        packing=rng.random() < 0.2, activation_offloading=rng.random() < 0.2)
    if method == "full":
        options["precision"] = rng.choice(["fp32", "bf16", "bf16-mixed", "bf16-mixed"])
        return model, options
    targets = rng.choice(["all-linear", "all-linear", "q_proj,v_proj"])
    options.update(
        precision=rng.choice(["bf16", "bf16-mixed", "bf16-mixed", "fp16-mixed"]), lora_r=rng.choice([8, 16, 64]),
        lora_targets=targets if targets == "all-linear" else ",".join(_attention_pair(model)),
        lora_dropout=rng.choice([0.0, 0.05]), adapter_dtype=rng.choice(["fp32", "fp32", "bf16"]),
        modules_to_save=rng.choice([(), (), ("lm_head",)]))
    if method.startswith("q"):
        options.update(quant_type=rng.choice(["nf4", "fp4"]), double_quant=rng.random() < 0.7,
                       kbit_upcast=rng.random() < 0.2)
    return model, options


@functools.cache
def _spec(model: str) -> Any:
    """The model's spec, resolved once per process: the catalog's, or the hub config copied into
    benchmarks/architectures.py."""
    from hf_ftkit.planner.resolve import resolve_model
    from hf_ftkit.planner.structure import spec_from_config

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from architectures import CONFIGS

    return spec_from_config(dict(CONFIGS[model]), model) if model in CONFIGS else resolve_model(model)


def _attention_pair(model: str) -> tuple[str, ...]:
    """The model's usual two-target LoRA: q_proj and v_proj, or its fused attention input where it has no q_proj."""
    names = {g.name for g in _spec(model).linears}
    if {"q_proj", "v_proj"} <= names:
        return "q_proj", "v_proj"
    return tuple(sorted(n for n in names if "qkv" in n or n in {"c_attn", "query_key_value", "Wqkv"}))[:1] or (
        sorted(names)[0],)


def draw_wide(rng: random.Random, models: tuple[str, ...] = MODELS) -> tuple[str, dict[str, Any]]:
    """``draw`` and then the options it leaves at their defaults: lengths up to 2,048, flash attention and
    padding-free batches, ranks up to 256 and MLP- or attention-only targets, the 4-bit compute dtype and storage."""
    model, options = draw(rng, models)
    options["seq_len"] = rng.choice([128, 512, 1024, 2048])
    if options["seq_len"] >= 1024:
        options["batch_size"] = 1
    if rng.random() < 0.3:
        options["attn_implementation"] = "flash_attention_2"
    if rng.random() < 0.2 and not options["packing"]:
        options["padding_free"] = True
    if options["method"] != "full":
        options["lora_r"] = rng.choice([8, 16, 64, 128, 256])
        if rng.random() < 0.2 and "q_proj" in options["lora_targets"]:
            options["lora_targets"] = rng.choice(["gate_proj,up_proj,down_proj", "q_proj,k_proj,v_proj,o_proj",
                                                  "down_proj"])
    if options["method"].startswith("q"):
        options.update(compute_dtype=rng.choice(["bf16", "bf16", "fp16", "fp32"]),
                       quant_storage=rng.choice(["uint8", "uint8", "bf16"]))
    return model, options


def compare(job: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], float | None, str, bool, float]:
    """(model, options, plan's error against --exact in %, or None with the error and whether it is a one-sentence
    refusal (PEFT refusing the adapter, as the run would: an answer, not a defect), seconds)."""
    warnings.simplefilter("ignore")
    from hf_ftkit.errors import BadInputError
    from hf_ftkit.planner.api import plan
    from hf_ftkit.planner.inputs import PlanInputs

    model, options = job
    start = time.perf_counter()
    try:
        inputs = PlanInputs(**options)
        spec = _spec(model)
        planned = plan(spec, inputs).allocated_peak_bytes
        exact = plan(spec, inputs, exact=True).allocated_peak_bytes
    except Exception as exc:  # the outcome to report: a defect, or a refusal the user would see
        refused = isinstance(exc, BadInputError)
        return model, options, None, f"{type(exc).__name__}: {str(exc)[:200]}", refused, time.perf_counter() - start
    return model, options, 100.0 * (planned - exact) / exact, "", False, time.perf_counter() - start


def main(argv: list[str]) -> int:
    wide = "--wide" in argv
    argv = [a for a in argv if a != "--wide"]
    seed = int(argv[0]) if argv else 1
    count = int(argv[1]) if len(argv) > 1 else 40
    models = tuple(argv[2].split(",")) if len(argv) > 2 else MODELS
    rng = random.Random(seed)
    jobs = [(draw_wide if wide else draw)(rng, models) for _ in range(count)]
    errors: list[float] = []
    failures = refusals = 0
    print(f"seed {seed}, {count} {'wide ' if wide else ''}draws: plan against --exact (allocated peak)")
    with ProcessPoolExecutor(2) as pool:
        for model, options, pct, failure, refused, seconds in pool.map(compare, jobs):
            name = model.rsplit("/", 1)[-1]
            if pct is None:
                refusals += refused
                failures += not refused
                print(f"{'REFUSED' if refused else 'FAILED '} {name:16s} {json.dumps(options)}  {failure}")
                continue
            errors.append(pct)
            mark = "!" if abs(pct) > FLAG_PCT else " "
            print(f"{mark} {pct:+6.1f}% {name:16s} {json.dumps(options)}  {seconds:.0f} s", flush=True)
    worst = max(errors, key=abs, default=0.0)
    over = sum(abs(e) > FLAG_PCT for e in errors)
    print(f"{len(errors)} compared: worst {worst:+.1f}%, {over} beyond ±{FLAG_PCT:.0f}%; {refusals} refused; "
          f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
