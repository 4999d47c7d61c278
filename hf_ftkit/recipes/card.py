"""The model card ``hf-ftkit train`` writes beside the trained adapter or model."""

from __future__ import annotations

from typing import Any

from hf_ftkit.recipes.loading import Recipe
from hf_ftkit.units import format_bytes


def model_card(recipe: Recipe, summary: dict[str, Any]) -> str:
    """A Hub-style README.md: YAML metadata, what was trained, on what, how, and what it measured."""
    import yaml

    m, t, s = recipe.model, recipe.training, recipe.script
    chosen = summary["chosen_setup"]
    adapter = chosen["method"] != "full"
    base = str(recipe.values.get("model_name_or_path", m.model_name_or_path))  # as the recipe names it
    meta = {"base_model": base, "library_name": "peft" if adapter else "transformers",
            "tags": ["hf-ftkit", "trl", "sft", chosen["method"]], "datasets": [str(s.dataset_name)]}
    plan = summary["plan"]
    final = summary["final"]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {'Adapter' if adapter else 'Fine-tuned model'} for {base}", "",
        f"Trained with `hf-ftkit train` from `{recipe.path}` ({chosen['rung']}) on `{s.dataset_name}`: "
        f"{summary['global_step']} steps, learning rate {t.learning_rate:g}, micro-batch {chosen['batch_size']} x "
        f"accumulation {chosen['gradient_accumulation_steps']}, max length {t.max_length}.", "",
        "| | |", "|---|---|",
        f"| method | {chosen['method']}" + (f" (r = {chosen['lora_r']})" if adapter else "") + " |",
        f"| planned peak per device | {format_bytes(plan['peak_bytes'])} "
        f"({plan.get('hardware') or 'no hardware declared'}) |",
        f"| first / last logged loss | {_fmt(final['first_logged_loss'])} / {_fmt(final['last_logged_loss'])} |",
        f"| eval loss | {_fmt(final['eval_loss'])} |",
    ]
    forgetting = summary.get("forgetting")
    if forgetting:
        end = forgetting["final"]
        lines.append(f"| held-out bits per byte (change) | {_fmt(end.get('bits_per_byte'))} "
                     f"({_fmt(end.get('bits_per_byte_delta_pct'))}%) |")
        lines.append(f"| KL(base ‖ tuned) per token | {_fmt(end.get('kl'))} |")
    if summary.get("merged"):
        lines.append("| merged model | `merged/` (verified against base + adapter) |")
    lines += ["", "Library versions, the full plan and timings: `run_summary.json`; the exact recipe: `recipe.yaml`.",
              ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"
