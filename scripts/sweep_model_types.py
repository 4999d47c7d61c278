"""Plan every causal-LM model type transformers knows, from its default config, and report what fails.

A generality check, not a benchmark: each model type is planned (LoRA, 128 tokens) in its own process with a
timeout, and the outcome is one of ``OK`` (a plan), ``FORMULAS`` (a plan from the formulas alone, with the
warning that the layers could not be traced, and why), ``PEFT_REFUSES`` (the same, where PEFT refuses the adapter
on the model's layers, as the run would), ``BADINPUT`` (a one-sentence refusal, as users see it) or ``CRASH`` (any
other exception: a defect). Default configs are what ``AutoConfig.for_model`` gives, which for
most types is the family's flagship size, so traced layers can take a while.

    python scripts/sweep_model_types.py              # all types, ~25 min on 2 cores
    python scripts/sweep_model_types.py gemma4_text  # some types
"""

from __future__ import annotations

import subprocess
import sys
import warnings


def plan_one(model_type: str) -> str:
    warnings.simplefilter("ignore")
    from transformers import AutoConfig

    from hf_ftkit.errors import BadInputError
    from hf_ftkit.planner.api import plan
    from hf_ftkit.planner.inputs import PlanInputs
    from hf_ftkit.planner.structure import spec_from_config

    try:
        config = {**AutoConfig.for_model(model_type).to_dict(), "model_type": model_type}
    except Exception as exc:  # transformers' own defaults do not validate
        return f"NOCONFIG {type(exc).__name__}"
    try:
        spec = spec_from_config(config, model_type)
        planned = plan(spec, PlanInputs(method="lora", seq_len=128, lora_dropout=0.0))
    except BadInputError as exc:
        return f"BADINPUT {exc}"
    except Exception as exc:
        return f"CRASH {type(exc).__name__}: {str(exc)[:160]}"
    size = f"{spec.params_total / 1e9:.2f}B {planned.allocated_peak_bytes / 2**30:.2f} GiB"
    for warning in planned.warnings:  # planned from the formulas alone: why the layers were not traced
        if "PEFT refuses this adapter configuration on its layers" in warning:
            return f"PEFT_REFUSES {size}: {warning.split('on its layers (', 1)[1][:160]}"
        if "tracing it failed here" in warning:
            return f"FORMULAS {size}: {warning.split('failed here (', 1)[1][:160]}"
    return f"OK {size}"


def main(model_types: list[str]) -> int:
    if not model_types:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_types = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    counts: dict[str, int] = {}
    for model_type in model_types:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                                  timeout=300)
            lines = done.stdout.strip().splitlines()
            outcome = lines[-1] if lines else f"CRASH exit {done.returncode}"
        except subprocess.TimeoutExpired:
            outcome = "TIMEOUT 300 s"
        counts[outcome.split()[0]] = counts.get(outcome.split()[0], 0) + 1
        print(f"{model_type}: {outcome[:200]}", flush=True)
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("CRASH") else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(plan_one(sys.argv[2]))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
