"""``hf-ftkit train``: validate a recipe, print its plan, train it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

EXIT_DOES_NOT_FIT = 1
EXIT_PREEMPTED = 130  # the CLI's "interrupted" code: a checkpoint was saved, --resume continues

EXAMPLES = """examples:
  hf-ftkit train --config recipes/smollm2/135m_lora_demo.yaml
  hf-ftkit train --config recipes/llama-3.1/8b_qlora_24gb.yaml --dry-run
  hf-ftkit train --config recipes/smollm2/135m_lora_demo.yaml --learning_rate 1e-4 --max_steps 50
  hf-ftkit train --config recipes/smollm2/135m_lora_demo.yaml --resume
  accelerate launch --config_file recipes/accelerate/fsdp.yaml -m hf_ftkit train --config RECIPE

exit codes: 0 trained, 1 the plan does not fit, 2 bad input, 130 interrupted or preempted (SIGTERM/SIGINT:
a checkpoint was saved first; continue with --resume).

Any key of trl.ScriptArguments, trl.ModelConfig, trl.SFTConfig or the recipe's hf-ftkit keys can be
overridden on the command line as --key value.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="Train a recipe (TRL SFT) with its memory plan checked.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate a recipe, print its plan on the declared hardware, and train it with SFTTrainer.",
    )
    p.add_argument("--config", required=True, metavar="RECIPE", help="the recipe YAML")
    p.add_argument("--dry-run", action="store_true", help="validate and plan only; load no weights")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    p.add_argument("--json", action="store_true", help="print the plan (dry run) or the run summary as JSON")
    p.set_defaults(func=run, accepts_overrides=True)
    return p


def run(args: argparse.Namespace, console: Console) -> int:
    from hf_ftkit.recipes import load_recipe, plan_recipe
    from hf_ftkit.recipes.run import train

    overrides = list(getattr(args, "overrides", []))
    recipe = load_recipe(args.config, overrides)
    planned = plan_recipe(recipe)
    if not args.json:
        _print_plan(console, planned)
    if args.dry_run:
        if args.json:
            print(json.dumps(planned.to_dict(), indent=2))
        return EXIT_DOES_NOT_FIT if planned.fits is False and not recipe.ftkit.fallback else 0
    if not args.json:
        console.print(_before_step_0(recipe))
    result = train(recipe, overwrite=args.overwrite, resume=args.resume, planned=planned)
    if args.json:
        print(json.dumps(result.summary, indent=2, default=str))
    if result.status == "preempted":
        print(f"hf-ftkit: preempted at step {result.global_step}; checkpoint saved in {result.output_dir}. "
              f"Continue with: hf-ftkit train --config {args.config} --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.summary and not args.json:
        final = result.summary["final"]
        console.print(f"[green]done[/]: {result.global_step} steps, loss {final['first_logged_loss']} -> "
                      f"{final['last_logged_loss']}{_forgetting_note(result.summary)}; outputs in {result.output_dir}")
    return 0


def _before_step_0(recipe: Any) -> str:
    """What happens before the first training step, so a bar sitting at 0% is not a mystery."""
    f = recipe.ftkit
    steps = [f"load {recipe.model.model_name_or_path}", f"tokenize {recipe.script.dataset_name}"]
    if f.forgetting_data:
        steps.append(f"measure the forgetting baseline on {f.forgetting_max_tokens:,} held-out tokens "
                     f"({f.forgetting_data})")
    return "before step 0: " + ", ".join(steps) + "."


def _forgetting_note(summary: dict[str, Any]) -> str:
    final = (summary.get("forgetting") or {}).get("final") or {}
    change, kl = final.get("bits_per_byte_delta_pct"), final.get("kl")
    if change is None:
        return ""
    return f", held-out bits per byte {change:+.1f}%" + (f" (KL {kl:.3g})" if kl is not None else "")


def _print_plan(console: Console, planned: Any) -> None:
    from hf_ftkit.cli.render import ladder_table, print_plan

    hardware = planned.hardware.label if planned.hardware else "no hardware declared"
    console.print(f"[bold]{planned.spec.model_id}[/] on {hardware}: {planned.setup.name}")
    if len(planned.setup.ladder) > 1:
        console.print(ladder_table(planned.setup))
    print_plan(console, planned.plan, [])
