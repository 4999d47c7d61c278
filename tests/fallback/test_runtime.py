"""Fault injection: real Trainer runs of a tiny model, an OOM raised from inside the model's forward."""

import functools
import json
from pathlib import Path

import pytest
import torch

from hf_ftkit.fallback.ladder import Rung, Setup
from hf_ftkit.fallback.runtime import can_resume, is_oom, train_with_fallback
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model

MAX_STEPS = 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_llama_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config)).save_pretrained(path)
    return path


def _setup(model_dir: Path, *rung_inputs: PlanInputs) -> Setup:
    spec = resolve_model(str(model_dir))
    rungs = [Rung(f"rung {i}", r, estimate(spec, r).peak_bytes, True, "") for i, r in enumerate(rung_inputs)]
    first = rung_inputs[0]
    return Setup(model=spec, plan=estimate(spec, first, 10**12), name="rung 0", budget_bytes=10**12, ladder=rungs)


def _factory(model_dir: Path, trainers: list):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = [list(range(5, 37))] * 8
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def make(setup: Setup, folder: Path):
        args = TrainingArguments(output_dir=str(folder), use_cpu=True, max_steps=MAX_STEPS, save_steps=2,
                                 logging_steps=1, report_to=[], seed=0, learning_rate=1e-3,
                                 **setup.training_overrides())
        trainer = Trainer(model=setup.load_model(str(model_dir)), args=args, train_dataset=data)
        trainers.append(trainer)
        return trainer

    return make


@pytest.fixture
def fail_forward(monkeypatch):
    """Make the model's forward raise ``error`` on the given call numbers."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    original = LlamaForCausalLM.forward
    calls = {"n": 0}

    def arm(error: BaseException, on_calls: set[int] | None):
        @functools.wraps(original)  # keep the signature Trainer reads to pick dataset columns
        def forward(self, *args, **kwargs):
            calls["n"] += 1
            if on_calls is None or calls["n"] in on_calls:
                raise error
            return original(self, *args, **kwargs)

        monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
        return calls

    return arm


def test_oom_in_full_finetuning_falls_back_to_lora(tiny_model_dir, tmp_path, fail_forward):
    fail_forward(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), {3})
    setup = _setup(tiny_model_dir, PlanInputs(method="full", batch_size=2, seq_len=32),
                   PlanInputs(method="lora", batch_size=2, seq_len=32))
    trainers: list = []
    summary = train_with_fallback(_factory(tiny_model_dir, trainers), setup, tmp_path)
    assert summary.completed and summary.final["method"] == "lora"
    (event,) = summary.fallbacks
    assert (event.step, event.action, event.before["method"]) == (2, "restart", "full")
    assert "out of memory" in event.error
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()  # the full-FT checkpoint survives
    assert trainers[-1].state.global_step == MAX_STEPS
    assert Path(summary.output_dir) == tmp_path / "fallback-1-lora"
    recorded = json.loads((tmp_path / "run_summary.json").read_text())
    assert recorded["fallbacks"][0]["after"]["method"] == "lora"


def test_same_method_fallback_resumes_with_optimizer_state(tiny_model_dir, tmp_path, fail_forward):
    calls = fail_forward(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), {3})
    setup = _setup(tiny_model_dir, PlanInputs(method="lora", batch_size=4, seq_len=32),
                   PlanInputs(method="lora", batch_size=2, gradient_accumulation_steps=2, seq_len=32))
    trainers: list = []
    summary = train_with_fallback(_factory(tiny_model_dir, trainers), setup, tmp_path)
    (event,) = summary.fallbacks
    assert event.action == "resume" and event.resumed_from.endswith("checkpoint-2")
    saved = torch.load(Path(event.resumed_from) / "optimizer.pt", weights_only=False)
    assert all(int(s["step"]) == 2 for s in saved["state"].values())
    resumed = trainers[-1]
    assert resumed.state.global_step == MAX_STEPS
    steps = [int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()]
    assert steps and all(s == MAX_STEPS for s in steps)
    # 2 good forwards + the failing one, then steps 3..6 at micro-batch 2 x accumulation 2 = 8 forwards
    # (a restart from step 0 would need 12)
    assert calls["n"] == 3 + (MAX_STEPS - 2) * 2


def test_lora_falls_back_to_qlora_keeping_adapter_and_optimizer(tiny_model_dir, tmp_path, fail_forward):
    # LoRA and QLoRA checkpoints hold the same adapter and optimizer states (the method table's
    # resume_keeps): the 4-bit run goes on from step 2 with them instead of starting over
    calls = fail_forward(torch.OutOfMemoryError("CUDA out of memory"), {3})
    setup = _setup(tiny_model_dir, PlanInputs(method="lora", batch_size=2, seq_len=32, precision="fp32"),
                   PlanInputs(method="qlora", batch_size=2, seq_len=32, precision="fp32", compute_dtype="fp32"))
    trainers: list = []
    summary = train_with_fallback(_factory(tiny_model_dir, trainers), setup, tmp_path)
    (event,) = summary.fallbacks
    assert (event.action, event.after["method"]) == ("resume", "qlora")
    assert event.resumed_from.endswith("checkpoint-2") and Path(summary.output_dir) == tmp_path
    saved = torch.load(Path(event.resumed_from) / "optimizer.pt", weights_only=False)
    resumed = trainers[-1]
    base = resumed.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ == "Linear4bit"
    states = resumed.optimizer.state_dict()["state"]
    assert len(states) == len(saved["state"]) and all(int(s["step"]) == MAX_STEPS for s in states.values())
    assert resumed.state.global_step == MAX_STEPS
    assert calls["n"] == 3 + (MAX_STEPS - 2)  # steps 3..6 only: a restart would run all 6 again


def test_resume_needs_the_same_checkpoint_contents():
    lora = PlanInputs(method="lora")
    assert can_resume(lora, lora.replace(method="qlora", quant_type="fp4", double_quant=True))
    assert not can_resume(lora, lora.replace(method="dora"))  # DoRA adds magnitude vectors
    assert not can_resume(lora, lora.replace(method="qlora", lora_r=lora.lora_r * 2))
    assert not can_resume(PlanInputs(method="full"), lora)
    assert can_resume(PlanInputs(method="dora"), PlanInputs(method="qdora", gradient_checkpointing=True))


def test_non_oom_errors_are_reraised(tiny_model_dir, tmp_path, fail_forward):
    fail_forward(ValueError("bad batch"), {1})
    setup = _setup(tiny_model_dir, PlanInputs(method="full", seq_len=32), PlanInputs(method="lora", seq_len=32))
    with pytest.raises(ValueError, match="bad batch"):
        train_with_fallback(_factory(tiny_model_dir, []), setup, tmp_path)
    assert not (tmp_path / "run_summary.json").exists()


def test_retries_are_bounded(tiny_model_dir, tmp_path, fail_forward):
    fail_forward(torch.OutOfMemoryError("CUDA out of memory"), None)
    setup = _setup(tiny_model_dir, PlanInputs(method="full", seq_len=32), PlanInputs(method="lora", seq_len=32),
                   PlanInputs(method="lora", seq_len=32, gradient_checkpointing=True))
    trainers: list = []
    with pytest.raises(torch.OutOfMemoryError):
        train_with_fallback(_factory(tiny_model_dir, trainers), setup, tmp_path, max_fallbacks=1)
    assert len(trainers) == 2
    summary = json.loads((tmp_path / "run_summary.json").read_text())  # written before the error ends the run
    assert summary["completed"] is False and "out of memory" in summary["error"]
    assert [e["after"]["method"] for e in summary["fallbacks"]] == ["lora"]


def test_oom_detection_and_resume_rules():
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("HIP out of memory. Tried to allocate"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    lora = PlanInputs(method="lora")
    assert can_resume(lora, lora.replace(batch_size=1, gradient_checkpointing=True))
    assert not can_resume(lora, lora.replace(optim="paged_adamw_8bit"))
    assert not can_resume(lora, lora.replace(method="dora"))
