"""What a finished (or preempted) run leaves in ``output_dir``: model or adapter, the resolved recipe,
``run_summary.json``, a model card, and the merged model when asked."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hf_ftkit._files import write_text_atomic

SUMMARY = "run_summary.json"


def write_outputs(run: Any, status: str, fallbacks: list[Any]) -> dict[str, Any]:
    """Save what the run produced (every rank takes part in saving; rank 0 writes the files)."""
    trainer, recipe, out = run.trainer, run.recipe, run.output_dir
    started = time.perf_counter()
    if status == "completed":
        trainer.save_model(str(out))  # adapter (safetensors) or full model, and the tokenizer
    run.timings["save_seconds"] = time.perf_counter() - started
    summary: dict[str, Any] = {}
    if not trainer.is_world_process_zero():
        return summary
    if status == "completed":
        _name_base_as_the_recipe_does(recipe, out)
    merged = _merge(run) if status == "completed" and recipe.ftkit.merge else None
    summary = _summary(run, status, fallbacks, merged)
    _write_recipe(run, out / "recipe.yaml")
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    if status == "completed":
        from hf_ftkit.recipes.card import model_card

        write_text_atomic(out / "README.md", model_card(recipe, summary))
    return summary


def _name_base_as_the_recipe_does(recipe: Any, out: Path) -> None:
    """The adapter names its base as the recipe and the model card do (a hub id or the recipe's own path),
    not the absolute local path it was loaded from, which means nothing on another machine."""
    config_file = out / "adapter_config.json"
    named = recipe.values.get("model_name_or_path")
    if not config_file.is_file() or not named:
        return
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(named)
    write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merge(run: Any) -> dict[str, Any]:
    from hf_ftkit.merge.config import MergeConfig
    from hf_ftkit.merge.run import merge_adapters

    recipe = run.recipe
    started = time.perf_counter()
    qlora = None
    inputs = run.setup.inputs  # the setup that trained last (a fallback may have changed it)
    if inputs.quantized_base:
        from hf_ftkit._dtypes import to_torch
        from hf_ftkit.merge.streaming import QloraTarget

        dtype = to_torch("fp32" if str(recipe.model.dtype) in ("float32", "None") else "bf16")
        qlora = QloraTarget("dequantized", quant_type=inputs.quant_type, double_quant=inputs.double_quant,
                            load_dtype=dtype)
    config = MergeConfig(dtype=recipe.ftkit.merge_dtype, qlora=qlora, overwrite=True)
    result = merge_adapters(str(recipe.model.model_name_or_path), [run.output_dir], run.output_dir / "merged", config)
    run.timings["merge_seconds"] = time.perf_counter() - started
    return result.to_dict()


def _peak_memory() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"device": "cpu", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def _losses(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    def last(key: str) -> float | None:
        return next((float(e[key]) for e in reversed(log_history) if key in e), None)

    first = next((float(e["loss"]) for e in log_history if "loss" in e), None)
    return {"first_logged_loss": first, "last_logged_loss": last("loss"), "train_loss": last("train_loss"),
            "eval_loss": last("eval_loss")}


def _summary(run: Any, status: str, fallbacks: list[Any], merged: dict[str, Any] | None) -> dict[str, Any]:
    from dataclasses import asdict

    from hf_ftkit.environment import collect

    trainer, planned = run.trainer, run.planned
    forgetting = None
    if run.forgetting is not None and run.forgetting.history:
        history = run.forgetting.history
        forgetting = {"baseline": history[0], "final": history[-1], "best": run.forgetting.best,
                      "crossed": run.forgetting.crossed, "seconds_measuring": run.forgetting.seconds_measuring}
    return {
        "status": status,
        "recipe": str(run.recipe.path),
        "output_dir": str(run.output_dir),
        "global_step": int(trainer.state.global_step),
        "max_steps": int(trainer.state.max_steps),
        "resumed_from": run.checkpoint,
        "preempted_by": run.preemption.signal_name if status == "preempted" else None,
        "checkpoint": _last_checkpoint(run.output_dir) if status == "preempted" else None,
        "versions": collect(),
        "plan": planned.to_dict(),
        "chosen_setup": planned.setup.chosen_dict(),
        "fallbacks": [asdict(e) for e in fallbacks],
        "measured_memory": _peak_memory(),
        "forgetting": forgetting,
        "merged": merged,
        "timings": {k: round(v, 2) for k, v in run.timings.items()},
        "final": _losses(trainer.state.log_history),
    }


def _last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out))


def _write_recipe(run: Any, path: Path) -> None:
    import yaml

    values = dict(run.recipe.values)
    if run.recipe.ftkit.method == "auto":
        values["method"] = run.planned.setup.inputs.method  # what auto chose, so the file reruns the same setup
        overrides = run.planned.setup.training_overrides()
        if "activation_checkpointing" in overrides:  # transformers v5: drop the deprecated names it replaces
            values.pop("gradient_checkpointing", None)
            values.pop("gradient_checkpointing_kwargs", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
    header = (f"# Resolved recipe of this run (from {run.recipe.path} and the command line), written by hf-ftkit.\n"
              f"# Rerun: hf-ftkit train --config {path}\n")
    write_text_atomic(path, header + yaml.safe_dump(values, sort_keys=False))
