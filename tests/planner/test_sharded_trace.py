"""FSDP plans against a real two-process sharded step (torchrun, gloo, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.structure import spec_from_config

# torchrun tests share one worker: two at once oversubscribe the cores (see pyproject's addopts)
pytestmark = pytest.mark.xdist_group("torchrun")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sharded_trace.py"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama-4L-32k"])  # the 128k-vocabulary case is in the benchmark (55 s more)
def test_fsdp_full_finetuning_plans_within_target_of_a_traced_sharded_step(model):
    spec_ = importlib.util.spec_from_file_location("sharded_trace", SCRIPT)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    config = bench.MODELS[model]
    traced = bench.trace(config, batch_size=1, seq_len=512, gradient_checkpointing=False)
    assert traced["REDUCE_SCATTER"] > 0 and traced["SHARDED_PARAM"] > 0  # the sharded buffers were seen
    plan = estimate(spec_from_config(config, model), PlanInputs(
        method="full", optim="adamw_torch", shard="fsdp", gpus=2, batch_size=1, seq_len=512))
    assert plan.allocated_peak_bytes == pytest.approx(traced["Total"], rel=0.08)
