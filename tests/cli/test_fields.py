"""plan's and compare's run flags come from PlanInputs: every field has one, names users know stay."""

from __future__ import annotations

from dataclasses import fields

from hf_ftkit.cli.main import make_parser
from hf_ftkit.cli.plan_cmd import inputs_from_args
from hf_ftkit.planner.inputs import PlanInputs

# Flag names that users and scripts call (a contract): generation must keep them.
KNOWN = ["--method", "--batch-size", "--seq-len", "--grad-accum", "--gradient-checkpointing", "--optim",
         "--precision", "--lora-r", "--lora-targets", "--lora-dropout", "--modules-to-save", "--quant-type",
         "--no-double-quant", "--kbit-upcast", "--quant-storage", "--gpus", "--nodes", "--shard", "--fsdp-strategy",
         "--offload", "--attn-implementation", "--packing", "--padding-free", "--activation-offloading",
         "--use-liger-kernel"]


def subparser(name: str):
    parser = make_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices[name]


def test_every_field_has_a_flag_and_known_names_stay():
    plan = subparser("plan")
    flags = {o for a in plan._actions for o in a.option_strings}
    assert set(KNOWN) <= flags
    dests = {a.dest for a in plan._actions}
    assert {f.name for f in fields(PlanInputs)} <= dests


def test_defaults_and_values_round_trip():
    plan = subparser("plan")
    assert inputs_from_args(plan.parse_args(["m"])) == PlanInputs()
    args = plan.parse_args(["m", "--grad-accum", "4", "--no-double-quant", "--modules-to-save", "embed_tokens,lm_head",
                            "--compute-dtype", "fp16", "--gpus", "2"])
    inputs = inputs_from_args(args)
    assert inputs.gradient_accumulation_steps == 4 and inputs.double_quant is False and inputs.compute_dtype == "fp16"
    assert inputs.modules_to_save == ("embed_tokens", "lm_head") and inputs.shard == "ddp"  # several GPUs


def test_compare_takes_the_same_generated_flags():
    compare = subparser("compare")
    args = compare.parse_args(["m", "--lora-r", "32", "--precision", "fp32"])
    assert args.lora_r == 32 and args.precision == "fp32" and args.batch_size == PlanInputs().batch_size
