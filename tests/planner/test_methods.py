"""The method table: one entry per method, read by the planner, the ladder, compare and the recipes."""

from __future__ import annotations

import pytest

from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import METHODS, PlanInputs
from hf_ftkit.planner.methods import all_rungs, method_info, quantized_twin, registry
from hf_ftkit.planner.resolve import resolve_model


def test_every_method_is_described_once_and_plans():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    assert METHODS == tuple(registry()) and {"full", "lora", "dora", "qlora", "qdora"} <= set(METHODS)
    for name in METHODS:
        info = method_info(name)
        assert info.label and info.deployment and info.rungs
        assert estimate(spec, PlanInputs(method=name)).trainable_params > 0
    positions = [r.position for r in all_rungs()]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_qdora_is_dora_on_a_4bit_base():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    qdora, qlora, dora = (estimate(spec, PlanInputs(method=m)) for m in ("qdora", "qlora", "dora"))
    assert quantized_twin("dora").name == "qdora" and quantized_twin("lora").name == "qlora"
    assert qdora.breakdown["weights"] == qlora.breakdown["weights"]  # the same 4-bit base
    assert qdora.breakdown["quant_constants"] == qlora.breakdown["quant_constants"]
    assert qdora.trainable_params == dora.trainable_params > qlora.trainable_params  # DoRA's magnitudes
    assert qlora.allocated_peak_bytes < qdora.allocated_peak_bytes < dora.allocated_peak_bytes


def test_an_unknown_method_names_the_table():
    from hf_ftkit.errors import BadInputError

    with pytest.raises(BadInputError, match="qdora"):
        PlanInputs(method="qdoraa")


@pytest.mark.parametrize("changes", [
    pytest.param(dict(gradient_checkpointing=True), marks=pytest.mark.slow),  # the quick tier keeps two
    dict(lora_targets="q_proj,v_proj", batch_size=4, seq_len=512),
    dict(),
])
def test_qdora_plan_matches_a_traced_step(changes):
    # the tracer's 4-bit stand-in dequantizes for DoRA's weight norm the way PEFT does for bitsandbytes
    from hf_ftkit.planner.structure import config_from_dict, spec_from_config
    from hf_ftkit.planner.trace import trace_step

    config = dict(resolve_model("meta-llama/Llama-3.2-1B").config, num_hidden_layers=4)
    inputs = PlanInputs(**{"method": "qdora", "seq_len": 1024, **changes})
    traced = trace_step(config_from_dict(config), inputs)
    planned = estimate(spec_from_config(config_from_dict(config), "llama-4-layers"), inputs)
    # the trace itself varies by ~2% between runs (when Python frees reference cycles): ±8% is the target
    assert planned.allocated_peak_bytes == pytest.approx(traced.peak_bytes, rel=0.08)
