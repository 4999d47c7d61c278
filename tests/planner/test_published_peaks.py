"""The calibration set of published GPU measurements: well-formed, plannable, and the plan holds on it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "published_peaks.json"
COUNTERS = {"max_memory_allocated": "allocated_peak_bytes", "max_memory_reserved": "reserved_peak_bytes",
            "memory_reserved_after_step_max": "reserved_peak_bytes", "nvidia_smi": "peak_bytes"}


def _points() -> list[dict]:
    return json.loads(DATA.read_text())["points"]


def test_every_point_names_its_source_counter_and_a_valid_configuration():
    points = _points()
    assert len({p["id"] for p in points}) == len(points)
    for p in points:
        assert {"repository", "path", "commit"} <= set(p["source"]) and p["quoted"] and p["confidence"]
        assert p["counter"] in COUNTERS and p["split"] in ("calibration", "held_out") and p["bytes"] > 0
        PlanInputs(**p["config"])  # raises on a field or value the planner does not know
    hf = [p for p in points if p["stack"] == "hf"]
    assert {p["split"] for p in hf} == {"calibration", "held_out"}


def test_transformers_stack_points_are_planned_within_target():
    errors, partly_known = [], []
    for p in _points():
        if p["stack"] != "hf":
            continue
        planned = estimate(resolve_model(p["model"]), PlanInputs(**p["config"])).to_dict()[COUNTERS[p["counter"]]]
        (errors if p.get("fully_known", True) else partly_known).append((planned - p["bytes"]) / p["bytes"])
    assert min(errors) > -0.10, "no fully known published run may be under-predicted by more than 10%"
    # PEFT's MetaMathQA runs are planned at their 768-token cap (padded, with the per-layer mask copies and repeated
    # k and v a padded batch holds). Their longest batch is not known: PEFT filters the data to 1300 characters so
    # that prompt and answer stay within the cap (its data.py), and its batches are bucketed by length, so a batch
    # reaches the cap rarely if at all. The plan leans over them, as it should where the longest batch is not known
    assert 0 < statistics.median(errors) <= 0.10
    # runs whose counter is not stated (per-GPU readings of multi-GPU 70B runs, most likely nvidia-smi) are
    # planned low today; this bound records how far, so that a change that widens the gap fails here
    assert partly_known and min(partly_known) > -0.35 and statistics.median(partly_known) > -0.15


def test_hand_written_loop_runs_one_gpu_and_fsdp_with_offload():
    # BenjaminBossan/peft-experiments: fully stated runs of transformers + PEFT models from hand-written loops
    errors = {}
    for p in _points():
        if p["stack"] == "hf-loop":
            planned = estimate(resolve_model(p["model"]), PlanInputs(**p["config"])).to_dict()[COUNTERS[p["counter"]]]
            errors[p["id"]] = (planned - p["bytes"]) / p["bytes"]
    assert any(PlanInputs(**p["config"]).offload == "params" for p in _points() if p["id"] in errors)
    # one-GPU QLoRA on all linears of Llama 3 8B: no autocast, and PEFT 0.12 kept a uint8-stored 4-bit base's
    # adapters in fp32 despite autocast_adapter_dtype=False (huggingface/peft#2893), so each target ran on an fp32
    # copy of its input. Planned under autocast with bf16 adapters, as it was, it read 14% under
    assert PlanInputs(**next(p["config"] for p in _points() if p["id"] == "peft-experiments-llama3-8b-qlora-all")) \
        .autocast is False
    # all five, FSDP with CPU offload of parameters included, plan within the target, and so do the reserved readings
    # of the same runs (the reserved model's only real-GPU readings whose allocated twins are known too)
    reserved = {k: e for k, e in errors.items() if k.endswith("-reserved")}
    assert len(errors) == 10 and len(reserved) == 5, errors
    assert all(abs(e) <= 0.08 for e in errors.values()), errors
