"""``hf-ftkit plan``: parser and a thin runner over :func:`hf_ftkit.plan`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any

from hf_ftkit.cli.fields import add_input_flags, input_values
from hf_ftkit.errors import BadInputError, HfFtkitWarning
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.inputs import (
    METHODS,
    PlanInputs,
)
from hf_ftkit.planner.resolve import catalog_ids, resolve_model
from hf_ftkit.planner.suggest import suggest, what_fits

if TYPE_CHECKING:
    from rich.console import Console

EXIT_DOES_NOT_FIT = 1

EXAMPLES = """examples:
  hf-ftkit plan meta-llama/Llama-3.1-8B --budget 24GiB
  hf-ftkit plan meta-llama/Llama-3.1-8B --method qlora --gradient-checkpointing --budget rtx4090
  hf-ftkit plan Qwen/Qwen2.5-72B --method full --gpus 8 --nodes 2 --shard zero3 --budget h100 --json
  hf-ftkit plan ./my-checkpoint --method lora --lora-targets q_proj,v_proj --what-fits --budget a100-80gb
  hf-ftkit plan meta-llama/Llama-3.1-8B --budget 24GiB --plot plan.png
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan", help="Plan the GPU memory of a fine-tuning run.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-device GPU memory of a fine-tuning run, before any weight is downloaded.",
    )
    d = PlanInputs()
    p.add_argument("model", nargs="?", help="hub id, checkpoint directory or config.json path")
    add_input_flags(p, overrides={
        "method": {"choices": (*METHODS, "auto"),
                   "help": "full, lora, dora, qlora; auto: walk the fallback ladder and pick the best setup that "
                           "fits --budget"},
        "lora_r": {"default": None, "help": f"LoRA rank (default {d.lora_r})"},  # None: say when full FT ignores it
        "shard": {"default": None, "help": "default: none on 1 GPU, ddp on several"},
        "modules_to_save": {"help": "comma-separated, e.g. embed_tokens,lm_head"},
    })
    p.add_argument("--budget", help="24GiB, 24GB, 80G, a GPU name (a100-80gb, h100, rtx4090, ...) or auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE", help="PNG: stacked bars of full/LoRA/DoRA/QLoRA side by side")
    p.add_argument("--exact", action="store_true", help="trace the full model step (slow; one device)")
    p.add_argument("--what-fits", action="store_true", help="largest micro-batch / seq len per method")
    p.add_argument("--check", action="store_true", help=f"exit {EXIT_DOES_NOT_FIT} when the plan does not fit")
    p.add_argument("--online", action="store_true", help="fetch config.json from the hub if not found offline")
    p.add_argument("--list-models", action="store_true", help="list the built-in catalog and exit")
    p.set_defaults(func=run)
    return p


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    values = input_values(args)
    if values.get("method") == "auto":
        values["method"] = "full"  # the ladder's first rung
    world = values.get("gpus", 1) * values.get("nodes", 1)
    values.setdefault("shard", "ddp" if world > 1 else "none")
    return PlanInputs(**values)


def run(args: argparse.Namespace, console: Console) -> int:
    """Plan, print (table or JSON), optionally plot; return the exit code."""
    if args.list_models:
        for model_id in catalog_ids():
            console.print(model_id)
        return 0
    if not args.model:
        raise BadInputError("MODEL is missing; pass a hub id, a checkpoint directory or a config.json path.")
    inputs = inputs_from_args(args)
    spec = resolve_model(args.model, allow_online=args.online)
    if args.method == "auto":
        return _run_auto(args, console, spec, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HfFtkitWarning)  # kept in result.warnings, printed below
        result = plan(spec, inputs, budget=args.budget, exact=args.exact)
    if not inputs.is_peft and args.lora_r is not None:
        result.warnings.append("--lora-r has no effect with --method full, which trains every weight; drop it or "
                               "choose --method lora.")
    if not (args.json or args.quiet):
        for message in result.warnings:
            print(f"warning: {message}", file=sys.stderr)
    suggestions = _with_auto_pick(spec, inputs, result, suggest(spec, result), args.budget)
    fit_rows = what_fits(spec, inputs, result.budget_bytes) if args.what_fits and result.budget_bytes else None
    if args.plot:
        _plot(spec, inputs, args, result)
    if args.json:
        data = result.to_dict()
        data["suggestions"] = [
            {"change": s.label, "settings": s.changes, "peak_bytes": s.peak_bytes, "saves_bytes": s.saves_bytes,
             "fits": s.fits}
            for s in suggestions
        ]
        if fit_rows is not None:
            data["what_fits"] = [r.__dict__ for r in fit_rows]
        print(json.dumps(data, indent=2))
    else:
        from hf_ftkit.cli.render import fits_table, print_plan

        print_plan(console, result, suggestions)
        if fit_rows is not None:
            console.print(fits_table(fit_rows, result.budget_label or "", inputs.seq_len, inputs.batch_size))
        elif args.what_fits:
            console.print("[yellow]--what-fits needs --budget.[/]")
    if args.check and result.fits is False:
        return EXIT_DOES_NOT_FIT
    return 0


def _with_auto_pick(spec: Any, inputs: PlanInputs, result: Any, suggestions: list[Any], budget: Any) -> list[Any]:
    """Put what ``--method auto`` would choose first, when the plan does not fit and no row already says it."""
    if result.fits is not False or not budget:
        return suggestions
    from hf_ftkit.errors import DoesNotFitError
    from hf_ftkit.fallback.ladder import choose_setup
    from hf_ftkit.planner.suggest import Suggestion

    try:
        setup = choose_setup(spec, budget, inputs)
    except (BadInputError, DoesNotFitError):
        return suggestions
    changes = {k: v for k, v in setup.inputs.to_dict().items() if inputs.to_dict().get(k) != v}
    if not setup.plan.fits or not changes or any(s.changes == changes for s in suggestions):
        return suggestions
    pick = Suggestion(f"what --method auto picks: {setup.name}", changes, setup.plan.peak_bytes,
                      result.peak_bytes - setup.plan.peak_bytes, True)
    return [pick, *suggestions]


def _run_auto(args: argparse.Namespace, console: Console, spec: Any, inputs: PlanInputs) -> int:
    """``--method auto``: the ladder, the chosen rung, and its plan."""
    from hf_ftkit.fallback.ladder import choose_setup

    if not args.budget:
        raise BadInputError("--method auto needs --budget (a size, a GPU name or auto).")
    setup = choose_setup(spec, args.budget, inputs)
    if args.json:
        data = setup.plan.to_dict()
        data["chosen"] = setup.chosen_dict()
        data["ladder"] = [
            {"rung": r.name, "method": r.inputs.method, "gradient_checkpointing": r.inputs.gradient_checkpointing,
             "optim": r.inputs.optim, "batch_size": r.inputs.batch_size,
             "gradient_accumulation_steps": r.inputs.gradient_accumulation_steps, "peak_bytes": r.peak_bytes,
             "fits": r.fits, "verdict": r.reason}
            for r in setup.ladder
        ]
        print(json.dumps(data, indent=2))
    else:
        from hf_ftkit.cli.render import ladder_table, print_plan

        console.print(ladder_table(setup))
        print_plan(console, setup.plan, [])
    return 0


def _plot(spec: Any, inputs: PlanInputs, args: argparse.Namespace, result: Any) -> None:
    from hf_ftkit.cli.plot import plot_plans

    plans = {}
    for method in METHODS:
        alt = inputs.replace(method=method)
        plans[method] = plan(spec, alt, budget=args.budget) if method != inputs.method else result
    title = f"{spec.model_id}: batch {inputs.batch_size} x {inputs.seq_len}, {inputs.precision}, {inputs.optim}"
    plot_plans(plans, args.plot, title)
