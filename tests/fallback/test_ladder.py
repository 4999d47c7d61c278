import json

import pytest

from hf_ftkit.cli.main import main
from hf_ftkit.errors import BadInputError, DoesNotFitError
from hf_ftkit.fallback.ladder import LadderLimits, choose_setup
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.units import GIB

MODEL = "meta-llama/Llama-3.1-8B"


def _peak(**changes) -> int:
    return estimate(resolve_model(MODEL), PlanInputs(seq_len=2048, **changes)).peak_bytes


def test_a_budget_only_qlora_fits_selects_qlora():
    lora_gc = _peak(method="lora", gradient_checkpointing=True)
    qlora_gc = _peak(method="qlora", gradient_checkpointing=True, double_quant=False)
    budget = (lora_gc + qlora_gc) // 2  # between the two planned peaks
    setup = choose_setup(MODEL, budget, seq_len=2048)
    assert setup.inputs.method == "qlora" and setup.inputs.gradient_checkpointing
    assert setup.plan.peak_bytes == qlora_gc <= budget
    chosen = [r.name for r in setup.ladder].index(setup.name)
    assert all(not r.fits for r in setup.ladder[:chosen])


def test_a_large_budget_keeps_full_finetuning():
    setup = choose_setup(MODEL, 400 * GIB, seq_len=2048)
    assert setup.inputs.method == "full" and setup.inputs.precision == "bf16-mixed"


def test_micro_batch_rungs_keep_the_effective_batch():
    setup = choose_setup(MODEL, "12GiB", seq_len=2048, batch_size=8, gradient_accumulation_steps=2)
    micro = [r for r in setup.ladder if "micro-batch" in r.name]
    assert micro and all(r.inputs.batch_size * r.inputs.gradient_accumulation_steps == 16 for r in micro)
    assert setup.inputs.batch_size * setup.inputs.gradient_accumulation_steps == 16


def test_limits_restrict_the_ladder():
    setup = choose_setup(MODEL, 400 * GIB, seq_len=2048, limits=LadderLimits(allow_full=False, min_lora_r=32))
    assert setup.inputs.method == "lora" and setup.inputs.lora_r == 32
    assert all(r.inputs.method != "full" for r in setup.ladder)
    fixed = choose_setup(MODEL, "40GiB", seq_len=2048, batch_size=4, limits=LadderLimits(fixed_micro_batch=True))
    assert all(r.inputs.batch_size == 4 for r in fixed.ladder)
    with pytest.raises(BadInputError, match="no rung"):
        choose_setup(MODEL, "24GiB", limits=LadderLimits(methods=("dora",), allow_full=False, min_lora_r=8,
                                                          fixed_micro_batch=True) and LadderLimits(methods=()))


def test_dora_users_step_down_to_qdora_and_the_default_ladder_has_neither():
    from hf_ftkit.fallback.ladder import ladder_rungs
    from hf_ftkit.planner.inputs import PlanInputs

    default = {r.method for _, r in ladder_rungs(PlanInputs(), LadderLimits())}
    assert default == {"full", "lora", "qlora"}
    dora = ladder_rungs(PlanInputs(), LadderLimits(methods=("dora", "qdora")))
    assert [r.method for _, r in dora][:4] == ["dora", "dora", "qdora", "qdora"]
    assert all(r.dora for _, r in dora)
    setup = choose_setup(MODEL, "16GiB", seq_len=1024, limits=LadderLimits(methods=("dora", "qdora")))
    assert setup.inputs.method == "qdora" and setup.inputs.quantized_base and setup.plan.fits
    assert setup.bnb_config() is not None and setup.lora_config().use_dora


def test_nothing_fits_names_the_smallest_and_the_shortfall():
    with pytest.raises(DoesNotFitError, match=r"GiB short"):
        choose_setup("meta-llama/Llama-3.1-405B", "24GiB")


def test_budget_below_the_fixed_overhead():
    with pytest.raises(BadInputError, match="fixed per-device overhead"):
        choose_setup(MODEL, "100MiB")


def test_setup_yields_the_stack_objects():
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    setup = choose_setup(MODEL, "12GiB", seq_len=1024)
    assert setup.inputs.method == "qlora"
    bnb = setup.bnb_config()
    assert isinstance(bnb, BitsAndBytesConfig) and bnb.load_in_4bit and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert isinstance(setup.lora_config(), LoraConfig)
    overrides = setup.training_overrides()
    assert overrides["activation_checkpointing_kwargs"] == {"use_reentrant": False}  # transformers v5's name
    assert overrides["optim"] == setup.inputs.optim
    sharded = choose_setup(MODEL, "12GiB", seq_len=1024, gpus=2, shard="fsdp")
    if sharded.inputs.method == "qlora":
        assert sharded.bnb_config().bnb_4bit_quant_storage == torch.bfloat16  # FSDP needs a float storage


def test_cli_method_auto_json(capsys):
    code = main(["plan", MODEL, "--method", "auto", "--budget", "24GiB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(data["chosen"]) >= {"method", "gradient_checkpointing", "optim", "batch_size",
                                   "gradient_accumulation_steps"}
    chosen = [r for r in data["ladder"] if r["rung"] == data["chosen"]["rung"]]
    assert chosen and chosen[0]["peak_bytes"] == data["peak_bytes"] and chosen[0]["fits"]
    assert main(["plan", MODEL, "--method", "auto"]) == 2  # needs a budget
    assert main(["plan", "meta-llama/Llama-3.1-405B", "--method", "auto", "--budget", "24GiB"]) == 1
