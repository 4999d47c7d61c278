import pytest

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.inputs import PlanInputs


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"method": "qlra"}, "--method"),
        ({"optim": "adamw_fast"}, "--optim"),
        ({"batch_size": 0}, "--batch-size"),
        ({"seq_len": -5}, "--seq-len"),
        ({"lora_r": 0}, "--lora-r"),
        ({"gpus": 4}, "--shard"),
        ({"offload": "optimizer"}, "--offload"),
        ({"gpus": 2, "shard": "zero2", "offload": "params"}, "--offload params"),
        ({"precision": "int8"}, "--precision"),
        ({"lora_targets": " "}, "--lora-targets"),
    ],
)
def test_invalid_inputs_name_the_flag(changes, flag):
    with pytest.raises(BadInputError) as err:
        PlanInputs(**changes)
    assert flag in str(err.value)


def test_typo_gets_a_suggestion():
    with pytest.raises(BadInputError, match="did you mean 'qlora'"):
        PlanInputs(method="qlra")


def test_targets_parse():
    assert PlanInputs().target_names() is None
    assert PlanInputs(lora_targets="q_proj, v_proj").target_names() == ["q_proj", "v_proj"]


def test_hf_argument_parser_reads_it():
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(PlanInputs).parse_args_into_dataclasses(
        ["--method", "lora", "--batch_size", "4", "--gradient_checkpointing"]
    )
    assert parsed.method == "lora" and parsed.batch_size == 4 and parsed.gradient_checkpointing
