"""The reserved peak: the plan's tensors replayed through the caching-allocator model."""

from __future__ import annotations

import pytest

from hf_ftkit.planner.allocator import replay
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.reserved import _Step
from hf_ftkit.planner.resolve import resolve_model

CASES = [dict(method="full"), dict(method="lora", gradient_checkpointing=True),
         dict(method="qlora", gradient_checkpointing=True, batch_size=4, seq_len=1024), dict(method="dora")]


@pytest.mark.parametrize("changes", CASES)
def test_the_replayed_tensors_request_what_the_plan_allocates(changes):
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    inputs = PlanInputs(**changes)
    replayed = _Step(spec, inputs).run()
    planned = estimate(spec, inputs)
    assert replayed.peak_requested == pytest.approx(planned.allocated_peak_bytes, rel=0.03)
    assert planned.reserved_peak_bytes == planned.allocated_peak_bytes + planned.breakdown["fragmentation"]
    assert planned.breakdown["fragmentation"] == replayed.peak_reserved - replayed.peak_requested > 0


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch_fused"])
def test_the_replay_sums_a_tied_embeddings_gradient_as_the_plan_does(optim):
    # at 2 x 128 tokens the step peaks where the LM head's part of the tied gradient, the embedding's and their sum
    # are alive at once; the replayed steps made the gradient once and requested one vocabulary-sized tensor less
    spec = resolve_model("Qwen/Qwen2.5-0.5B")
    inputs = PlanInputs(method="full", precision="fp32", optim=optim, batch_size=2, seq_len=128)
    replayed = _Step(spec, inputs).run()
    assert replayed.peak_requested == pytest.approx(estimate(spec, inputs).allocated_peak_bytes, rel=0.02)


def test_json_reports_reserved_and_the_verdict_counts_it_with_the_context():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    base = estimate(spec, PlanInputs(method="qlora", gradient_checkpointing=True))
    data = base.to_dict()
    assert data["reserved_peak_bytes"] == base.reserved_peak_bytes > data["allocated_peak_bytes"]
    assert data["peak_bytes"] == base.reserved_peak_bytes + base.breakdown["cuda_context"]
    between = base.allocated_peak_bytes + base.breakdown["cuda_context"] + base.breakdown["fragmentation"] // 2
    assert plan(spec, base.inputs, budget=between).fits is False
    assert plan(spec, base.inputs, budget=base.peak_bytes).fits is True


def test_shorter_batches_before_a_long_one_leave_blocks_the_long_one_cannot_use():
    # the 152k-vocabulary loss tensors of a half-length step do not hold the full-length step's
    spec = resolve_model("Qwen/Qwen2.5-0.5B")
    varied = estimate(spec, PlanInputs(method="lora", gradient_checkpointing=True, seq_len=4096))
    packed = estimate(spec, PlanInputs(method="lora", gradient_checkpointing=True, seq_len=4096, packing=True))
    logits_fp32 = 4 * spec.vocab_size * 4096
    assert varied.breakdown["fragmentation"] - packed.breakdown["fragmentation"] >= logits_fp32 // 2


@pytest.mark.parametrize("changes", [dict(method="lora", gradient_checkpointing=True),
                                     dict(method="full", batch_size=4, seq_len=512)])
def test_reserved_peak_matches_the_replay_of_a_traced_step(changes):
    # the reference is the traced step's own allocation sequence: it checks the plan's tensor cut and order
    from hf_ftkit.planner.structure import config_from_dict, spec_from_config
    from hf_ftkit.planner.trace import trace_step

    config = dict(resolve_model("meta-llama/Llama-3.2-1B").config, num_hidden_layers=4)
    spec = spec_from_config(config_from_dict(config), "llama-4-layers")
    inputs = PlanInputs(**{"batch_size": 1, "seq_len": 1024, **changes})
    traced = trace_step(config_from_dict(config), inputs)
    replayed = replay(traced.events)
    reference = traced.peak_bytes + replayed.peak_reserved - replayed.peak_requested
    assert estimate(spec, inputs).reserved_peak_bytes == pytest.approx(reference, rel=0.08)
