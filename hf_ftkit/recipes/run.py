"""``train``: run a recipe with SFTTrainer and hf-ftkit's callbacks, and write what the run produced."""

from __future__ import annotations

import copy
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError, DoesNotFitError
from hf_ftkit.fallback.ladder import Setup
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.recipes.data import load_splits, pick_split, resolve_dataset
from hf_ftkit.recipes.loading import Recipe
from hf_ftkit.recipes.outputs import write_outputs
from hf_ftkit.recipes.planning import RecipePlan, plan_recipe
from hf_ftkit.recipes.preemption import PreemptionCallback, preemption_signals
from hf_ftkit.units import format_bytes

RUN_MARKERS = ("run_summary.json", "recipe.yaml", "trainer_state.json")


@dataclass
class TrainResult:
    """What ``train`` did: ``status`` is ``planned`` (dry run), ``completed`` or ``preempted``."""

    status: str
    plan: RecipePlan
    output_dir: Path
    global_step: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def train(recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, resume: bool = False,
          planned: RecipePlan | None = None) -> TrainResult:
    """Plan the recipe on its hardware, then (unless ``dry_run``) train it and write the outputs.

    Args:
        recipe: from :func:`load_recipe`.
        dry_run: plan only; nothing is loaded or written.
        overwrite: replace the run already in ``output_dir``.
        resume: continue from the last checkpoint in ``output_dir``.
        planned: the recipe's plan when the caller already made it (else it is made here).

    Raises:
        BadInputError: the data, the output folder or the machine does not suit the recipe.
        DoesNotFitError: the plan does not fit the declared hardware (and neither ``method: auto``
            nor ``fallback: true`` may change the setup).

    Example:
        >>> result = train(load_recipe("recipes/smollm2/135m_lora_demo.yaml"))
        >>> result.summary["final"]["train_loss"]
    """
    planned = planned or plan_recipe(recipe)  # the caller's plan when it already made one
    output_dir = Path(recipe.training.output_dir)
    source = resolve_dataset(str(recipe.script.dataset_name), recipe.path)
    if planned.fits is False and not recipe.ftkit.fallback:
        short = planned.plan.peak_bytes - (planned.plan.budget_bytes or 0)
        raise DoesNotFitError(f"the recipe needs {format_bytes(planned.plan.peak_bytes)} per device, "
                              f"{format_bytes(short)} more than {planned.budget_label}; use method: auto, "
                              "fallback: true, or fix the recipe as the plan's suggestions say.")
    if dry_run:
        return TrainResult("planned", planned, output_dir)
    _check_machine(recipe)
    wanted = recipe.training.resume_from_checkpoint  # the TRL key does what --resume does
    if wanted and str(wanted).lower() not in ("true", "1", "last"):
        if not (Path(wanted) / "trainer_state.json").is_file():
            raise BadInputError(f"resume_from_checkpoint: {wanted} is not a checkpoint folder; pass one of "
                                f"{output_dir}/checkpoint-N or use --resume for the last one.")
        _prepare_output(output_dir, overwrite=False, resume=True)
        checkpoint: str | None = str(wanted)
        replaced: list[Path] = []
    else:
        checkpoint, replaced = _prepare_output(output_dir, overwrite=overwrite, resume=resume or bool(wanted))
    return _Run(recipe, planned, output_dir, source, checkpoint, replaced).execute()


def _check_machine(recipe: Recipe) -> None:
    import torch

    t = recipe.training
    if (t.bf16 or t.fp16) and not t.use_cpu and not torch.cuda.is_available():
        precision = "bf16" if t.bf16 else "fp16"
        raise BadInputError(f"the recipe trains in {precision} on a GPU and this machine has none; to try it on CPU "
                            f"add --use_cpu true --{precision} false.")


def _prepare_output(output_dir: Path, *, overwrite: bool, resume: bool) -> tuple[str | None, list[Path]]:
    """The checkpoint to resume from, and what ``--overwrite`` replaces: the earlier run's checkpoints, fallback
    folders, merged model, summary and markers (other files stay). Refuses a folder holding another run unless told
    what to do. Nothing is deleted here: :meth:`_Run.make_trainer` clears the list once the new run's data and model
    have loaded, so a recipe that fails before training starts leaves the earlier run as it was."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume:
        if last is None:
            raise BadInputError(f"--resume: {output_dir} holds no checkpoint to resume from; run without --resume.")
        return last, []
    occupied = output_dir.is_dir() and (last is not None or any((output_dir / m).exists() for m in RUN_MARKERS))
    if occupied and not overwrite:
        raise BadInputError(f"{output_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                            "it, or choose another output_dir.")
    if not occupied:
        return None, []
    return None, sorted(entry for entry in output_dir.iterdir() if _written_by_a_run(entry))


def _written_by_a_run(entry: Path) -> bool:
    if entry.is_dir() and not entry.is_symlink():
        return entry.name.startswith(("checkpoint-", "fallback-")) or entry.name == "merged"
    return entry.name in (*RUN_MARKERS, "forgetting.json", "forgetting.png")


def _clear(entries: list[Path]) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


class _Run:
    """One training run of a recipe (the trainer factory the runtime fallback calls)."""

    def __init__(self, recipe: Recipe, planned: RecipePlan, output_dir: Path, source: Path | str,
                 checkpoint: str | None, replaced: list[Path]) -> None:
        self.recipe, self.planned, self.output_dir, self.checkpoint = recipe, planned, output_dir, checkpoint
        self.replaced = replaced  # the earlier run's outputs, cleared once the first trainer is built
        self.source = source
        self.preemption = PreemptionCallback()
        self.forgetting: Any = None
        self.trainer: Any = None
        self.setup = planned.setup  # the setup of the latest trainer
        self.timings: dict[str, float] = {}

    def execute(self) -> TrainResult:
        started = time.perf_counter()
        s, t = self.recipe.script, self.recipe.training
        splits = load_splits(self.source, s.dataset_config)
        self.train_data = pick_split(splits, s.dataset_train_split, self.source)
        wants_eval = str(getattr(t.eval_strategy, "value", t.eval_strategy)) != "no"
        self.eval_data = pick_split(splits, s.dataset_test_split, self.source, required=wants_eval)
        self.timings["data_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        fallbacks: list[Any] = []
        with preemption_signals(self.preemption):
            if self.recipe.ftkit.fallback:
                from hf_ftkit.fallback.runtime import train_with_fallback

                ran = train_with_fallback(self.make_trainer, self.planned.setup, self.output_dir,
                                              max_fallbacks=self.recipe.ftkit.max_fallbacks, summary_file=None,
                                              resume_from_checkpoint=self.checkpoint)
                fallbacks = ran.fallbacks
            else:
                self.make_trainer(self.planned.setup, self.output_dir).train(resume_from_checkpoint=self.checkpoint)
        self.timings["train_seconds"] = time.perf_counter() - started
        status = "preempted" if self.preemption.stopped_at is not None else "completed"
        summary = write_outputs(self, status, fallbacks)
        return TrainResult(status, self.planned, self.output_dir, int(self.trainer.state.global_step), summary)

    def make_trainer(self, setup: Setup, folder: Path) -> Any:
        """An SFTTrainer for ``setup`` writing to ``folder``, built as ``trl sft`` builds it."""
        from trl import SFTTrainer

        from hf_ftkit.callbacks.memory import MemoryBudgetCallback

        r, inputs = self.recipe, setup.inputs
        self.setup = setup
        args = copy.deepcopy(r.training)
        args.output_dir = str(folder)
        from hf_ftkit._progress import progress_enabled

        if not progress_enabled():
            args.disable_tqdm = True  # no bar redrawn into a redirected log (the logged lines stay)
        if setup is not self.planned.setup or r.ftkit.method == "auto":
            _apply(args, setup)
        m = r.model
        args.model_init_kwargs = {"revision": m.model_revision, "trust_remote_code": args.trust_remote_code,
                                  "attn_implementation": m.attn_implementation, "dtype": m.dtype,
                                  **(r.training.model_init_kwargs or {})}
        callbacks: list[Any] = [self.preemption]
        budget = r.ftkit.budget or (self.planned.hardware.gpu if self.planned.hardware else None)
        callbacks.append(MemoryBudgetCallback(budget=budget, plan=setup.plan))
        self.forgetting = self._forgetting_callback()
        if self.forgetting is not None:
            callbacks.append(self.forgetting)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            self.trainer = SFTTrainer(
                model=str(m.model_name_or_path), args=args, train_dataset=self.train_data,
                eval_dataset=self.eval_data, peft_config=_lora_config(m, inputs),
                quantization_config=setup.bnb_config(), callbacks=callbacks,
            )
        prepared = self.trainer.train_dataset
        if hasattr(prepared, "__len__") and len(prepared) == 0:
            raise BadInputError(f"no training example is left after tokenizing: max_length {args.max_length} cuts off "
                                "every completion (SFTTrainer drops fully masked examples); raise max_length.")
        _clear(self.replaced)  # --overwrite: the new run has loaded, the earlier one goes
        self.replaced = []
        return self.trainer

    def _forgetting_callback(self) -> Any:
        f = self.recipe.ftkit
        if not f.forgetting_data:
            return None
        from hf_ftkit.forgetting import ForgettingCallback, stdlib_documents

        data: Any = stdlib_documents() if f.forgetting_data == "stdlib" else f.forgetting_data
        every: Any = "eval" if f.forgetting_every == "eval" else int(f.forgetting_every)
        return ForgettingCallback(data, max_tokens=f.forgetting_max_tokens, every=every,
                                  threshold=f.thresholds() or None, action=f.forgetting_action)  # type: ignore[arg-type]


def _apply(args: Any, setup: Setup) -> None:
    """The setup's batch, accumulation, optimizer, checkpointing and precision on a copy of the recipe's args."""
    for key, value in setup.training_overrides().items():
        if key in ("bf16", "fp16") and args.use_cpu:
            continue  # a CPU run keeps the recipe's precision
        setattr(args, key, value)
        if key.startswith("activation_checkpointing"):  # transformers v5 mirrors the old name only at construction,
            setattr(args, key.replace("activation", "gradient"), value)  # and TRL still reads the old one


def _lora_config(m: Any, inputs: PlanInputs) -> Any:
    """TRL's LoRA keys from the recipe, with the rank and method the setup chose; None for full FT."""
    if not inputs.is_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=m.lora_task_type, r=inputs.lora_r, lora_alpha=m.lora_alpha,
                      lora_dropout=m.lora_dropout, target_modules=m.lora_target_modules,
                      target_parameters=m.lora_target_parameters, modules_to_save=m.lora_modules_to_save,
                      use_rslora=m.use_rslora, use_dora=inputs.dora or bool(m.use_dora))
