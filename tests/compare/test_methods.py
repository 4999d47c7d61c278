"""`compare`: every number traced back to the planner, the FLOP counts and the stated formulas."""

import json

import pytest

from hf_ftkit.compare import compare_methods, flops_per_token
from hf_ftkit.compare.methods import find_placement, gpu_counts
from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.budget import find_gpu
from hf_ftkit.planner.inputs import PlanInputs

H100 = find_gpu("h100")
H100_BYTES = H100["memory_mib"] * 1024**2


@pytest.fixture(scope="module")
def table70b():
    return compare_methods("meta-llama/Llama-3.1-70B", gpu="h100", tokens=50_000_000, price_per_gpu_hour=2.5)


def test_gpu_counts_double_within_a_node_then_add_nodes():
    assert gpu_counts(40, 8) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert gpu_counts(3, 8) == [1, 2]


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora", "qdora"])
def test_memory_and_gpu_count_are_the_planners(table70b, method):
    row = table70b.rows[method]
    p = row.placement
    assert p is not None
    again = plan("meta-llama/Llama-3.1-70B", p.plan.inputs, budget=H100_BYTES)
    assert again.peak_bytes == p.plan.peak_bytes and again.fits
    assert p.plan.inputs.world_size == p.gpus and p.plan.inputs.method == method
    # minimal: no sharding and no checkpointing setting fits on the next smaller count
    counts = gpu_counts(512, 8)
    smaller = counts[counts.index(p.gpus) - 1] if p.gpus > 1 else None
    if smaller:
        nodes, gpus = (1, smaller) if smaller <= 8 else (smaller // 8, 8)
        for shard in ("fsdp", "zero3") if smaller > 1 else ("none",):
            for ckpt in (False, True):
                trial = p.plan.inputs.replace(gpus=gpus, nodes=nodes, shard=shard, gradient_checkpointing=ckpt)
                assert not plan("meta-llama/Llama-3.1-70B", trial, budget=H100_BYTES).fits
    assert row.trainable_params == p.plan.trainable_params


def test_qdora_time_composes_doras_and_qloras_published_slowdowns(table70b):
    from hf_ftkit.compare.methods import slowdown

    dora, qlora, qdora = slowdown("dora"), slowdown("qlora"), slowdown("qdora")
    assert qdora["factor"] == pytest.approx(dora["factor"] * qlora["factor"])
    assert qdora["range"] == pytest.approx([dora["range"][0] * qlora["range"][0], dora["range"][1] * qlora["range"][1]])
    assert "estimated" in qdora["composed"] and slowdown("lora") is None
    row = table70b.rows["qdora"]
    assert row.placement.plan.inputs.quantized_base and row.placement.plan.inputs.dora
    assert row.hours > table70b.rows["qlora"].hours


def test_time_and_cost_follow_the_flops(table70b):
    from hf_ftkit.compare.methods import slowdown

    for row in table70b.rows.values():
        p = row.placement
        expected = flops_per_token(table70b.model, p.plan.inputs)
        assert row.flops.total == pytest.approx(expected.total, rel=1e-12)
        published = slowdown(row.method)  # DoRA/QLoRA: LoRA's FLOPs x their measured slowdown
        timed = expected if published is None else flops_per_token(table70b.model,
                                                                    p.plan.inputs.replace(method="lora"))
        hours = 50_000_000 * timed.total / (p.gpus * 989.4e12 * 0.4) / 3600 * (published or {"factor": 1})["factor"]
        assert row.hours == pytest.approx(hours, rel=1e-12)
        assert row.cost == pytest.approx(hours * p.gpus * 2.5, rel=1e-12)


def test_70b_full_needs_many_gpus_qlora_one_h100_and_none_fits_a_4090(table70b):
    rows = table70b.rows
    assert rows["qlora"].placement.gpus == 1
    assert rows["full"].placement.gpus >= 16  # ~16 bytes per parameter of model states alone
    assert rows["lora"].placement.gpus > rows["qlora"].placement.gpus
    consumer = compare_methods("meta-llama/Llama-3.1-70B", gpu="rtx4090", tokens=10**6)
    assert consumer.rows["qlora"].placement.gpus > 1  # 35 GB of 4-bit weights alone exceed 24 GB


def test_sizes_on_disk(table70b):
    spec = table70b.model
    assert table70b.rows["full"].artifact_bytes == 2 * spec.params_total
    lora = table70b.rows["lora"]
    assert lora.artifact_bytes == 4 * lora.trainable_params
    assert table70b.rows["full"].checkpoint_bytes > 10 * table70b.rows["full"].artifact_bytes / 2


def test_auto_checkpointing_only_when_it_saves_gpus():
    spec = "meta-llama/Llama-3.1-8B"
    auto = compare_methods(spec, gpu="h100", tokens=10**6).rows["lora"].placement
    assert auto.gpus == 1 and auto.gradient_checkpointing is False
    assert plan(spec, auto.plan.inputs, budget=H100_BYTES).fits
    forced = compare_methods(spec, gpu="h100", tokens=10**6, checkpointing="on").rows["lora"].placement
    assert forced.gradient_checkpointing is True


def test_not_fitting_within_max_gpus_is_reported():
    result = compare_methods("meta-llama/Llama-3.1-70B", gpu="rtx4090", tokens=10**6, max_gpus=2)
    assert result.rows["full"].placement is None and result.rows["full"].hours is None
    assert result.to_dict()["methods"]["full"]["fits"] is False
    assert find_placement(result.model, PlanInputs(method="full"), 1, max_gpus=4) is None


def test_measured_forgetting_replaces_the_qualitative_risk(tmp_path):
    report = tmp_path / "lora.json"
    report.write_text(json.dumps({"base": {"bits_per_byte": 0.8}, "tuned": {"bits_per_byte": 0.84}, "kl": 0.05}))
    result = compare_methods("HuggingFaceTB/SmolLM2-135M", gpu="rtx4090", tokens=10**6, forgetting={"lora": report})
    row = result.rows["lora"]
    assert row.basis["forgetting_risk"] == "measured"
    assert row.forgetting["bits_per_byte_delta_pct"] == pytest.approx(5.0)
    assert "+5.00% bits/byte" in row.forgetting_risk and result.rows["full"].forgetting_risk == "higher"


@pytest.mark.parametrize("kwargs, words", [
    ({"gpu": "h1000"}, "known GPUs: a10,"),
    ({"tokens": 0}, "--tokens must be greater than zero"),
    ({"price_per_gpu_hour": -1.0}, "--price-per-gpu-hour must be zero or more"),
    ({"utilization": 1.5}, "--utilization"),
    ({"forgetting": {"lorra": "x.json"}}, "unknown method 'lorra'"),
    ({"forgetting": {"lora": "missing.json"}}, "does not exist"),
])
def test_bad_input_is_one_sentence(kwargs, words):
    with pytest.raises(BadInputError, match=words.replace("(", r"\(")):
        compare_methods("meta-llama/Llama-3.1-8B", **{"tokens": 10**6, **kwargs})


def test_published_slowdowns_match_the_figures_they_cite():
    import re

    from hf_ftkit._data import load

    for method, entries in load("throughput")["methods"].items():
        assert entries, method
        for entry in entries:
            numbers = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) (?:s|min)\b", entry["figures"])]
            assert len(numbers) == 2, entry["figures"]
            assert entry["factor"] == pytest.approx(numbers[0] / numbers[1], abs=0.005), entry
            assert entry["source"] and entry["gpu"] and entry["model"]


def test_dora_and_qlora_time_is_loras_times_their_published_slowdown():
    from hf_ftkit.compare.methods import slowdown

    result = compare_methods("meta-llama/Llama-3.1-8B", gpu="rtx4090", tokens=50 * 10**6)
    lora = result.rows["lora"]
    for method in ("dora", "qlora"):
        row, factor = result.rows[method], slowdown(method)
        assert factor is not None and 1 < factor["range"][0] <= factor["factor"] <= factor["range"][1]
        same_gpus = row.placement.gpus == lora.placement.gpus and (row.placement.gradient_checkpointing
                                                                    == lora.placement.gradient_checkpointing)
        if same_gpus:  # then LoRA's FLOPs time is the base the factor multiplies
            assert row.hours == pytest.approx(lora.hours * factor["factor"], rel=1e-9)
        low, high = row.hours_range
        assert low < row.hours < high and row.hours > lora.hours
        assert row.to_dict()["throughput_vs_lora"]["sources"]
    assert result.rows["lora"].hours_range is None and result.rows["full"].to_dict()["throughput_vs_lora"] is None


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_pruned_placement_is_the_one_an_exhaustive_search_finds(method):
    # find_placement skips plans whose slack-free lower bound cannot fit or cannot beat the best found; the
    # placement must be the one planning every count and shard in order would pick
    spec, budget = "meta-llama/Llama-3.1-8B", 20 * 2**30
    inputs = PlanInputs(method=method, seq_len=4096)
    expected = None
    for count in gpu_counts(64, 8):
        nodes, gpus = (1, count) if count <= 8 else (count // 8, 8)
        for recompute in (False, True):
            fitting = [plan(spec, inputs.replace(gpus=gpus, nodes=nodes, shard=shard, gradient_checkpointing=recompute),
                            budget=budget) for shard in (("none",) if count == 1 else ("fsdp", "zero3"))]
            fitting = [p for p in fitting if p.fits]
            if fitting:
                expected = min(fitting, key=lambda p: p.peak_bytes)
                break
        if expected is not None:
            break
    found = find_placement(plan(spec, inputs).model, inputs, budget, max_gpus=64)
    assert expected is not None and found is not None
    assert found.plan.inputs == expected.inputs and found.plan.peak_bytes == expected.peak_bytes
