"""DoRA's activations against a training step on real tensors (no FakeTensorMode), the reference that shares
neither the planner's formulas nor the fake trace's reference cycles."""

import pytest

import hf_ftkit.planner.activations as act
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.structure import config_from_dict, spec_from_config
from hf_ftkit.planner.trace import trace_step

SMALL = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8192, "tie_word_embeddings": False,
         "max_position_embeddings": 2048}


@pytest.mark.parametrize("changes", [dict(), dict(lora_targets="q_proj,v_proj"), dict(seq_len=128),
                                     dict(seq_len=128, lora_dropout=0.0)])
def test_dora_plan_matches_a_real_step(changes):
    # at 128 tokens over two layers the weight norm's graphs weigh most: while the tracer's module hooks held them
    # in reference cycles, the plan read 5-8% under the real step
    config = dict(SMALL, num_hidden_layers=2)
    inputs = PlanInputs(**{"method": "dora", "seq_len": 512, **changes})
    real = trace_step(config_from_dict(dict(config)), inputs, real=True).peak_bytes
    planned = estimate(spec_from_config(dict(config), "small-llama"), inputs).allocated_peak_bytes
    assert planned == pytest.approx(real, rel=0.04)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_the_fake_trace_is_the_real_step(dropout):
    # FakeTensorMode changes no allocation: the traced DoRA step is the real one to the byte (with ModTracker's
    # module hooks, whose reference cycles outlived the weight norm's graphs, it read 2.6-7.0% over)
    config, inputs = config_from_dict(dict(SMALL, num_hidden_layers=2)), PlanInputs(method="dora", seq_len=128,
                                                                                       lora_dropout=dropout)
    assert trace_step(config, inputs).peak_bytes == trace_step(config, inputs, real=True).peak_bytes


@pytest.mark.slow
@pytest.mark.parametrize("changes", [dict(), dict(lora_dropout=0.0), dict(lora_targets="q_proj,v_proj")])
def test_dora_plan_matches_a_real_step_of_llama_1b_layers(changes):
    # Llama-3.2-1B's layers (four of them, a 32k vocabulary); before the weight copy was counted once, and only
    # with dropout, the plan was 11.6% and 22.3% over the first two cases
    config = dict(resolve_model("meta-llama/Llama-3.2-1B").config, num_hidden_layers=4, vocab_size=32768)
    inputs = PlanInputs(**{"method": "dora", "seq_len": 1024, **changes})
    real = trace_step(config_from_dict(dict(config)), inputs, real=True).peak_bytes
    planned = estimate(spec_from_config(config_from_dict(dict(config)), "llama-4-layers"), inputs)
    assert planned.allocated_peak_bytes == pytest.approx(real, rel=0.04)


def test_dora_keeps_a_weight_copy_per_target_only_with_dropout():
    spec = spec_from_config(dict(SMALL), "small-llama")
    with_dropout, without = (PlanInputs(method="dora", lora_dropout=p) for p in (0.05, 0.0))
    lora = PlanInputs(method="lora")
    weights = sum(g.in_features * g.out_features * g.count for g in spec.linears) / spec.num_layers
    assert act.layer_constant_bytes(spec, with_dropout) - act.layer_constant_bytes(spec, lora) == 2 * weights
    assert act.layer_constant_bytes(spec, without) == act.layer_constant_bytes(spec, lora)
    # the weight norm's temporaries: the widest target's product, fp32 copies and sum, plus the identity's cast
    down = 2048 * 512
    assert act.dora_transient_bytes(spec, without) == 2 * 2048 * 2048 + 18 * down
    assert act.dora_transient_bytes(spec, lora) == 0


@pytest.mark.parametrize("precision,adapter_dtype", [
    ("bf16-mixed", "bf16"), ("bf16", "bf16"),
    pytest.param("fp16-mixed", "bf16", marks=pytest.mark.slow),  # 8 s: whole suite only
    ("fp32", "bf16"), ("bf16-mixed", "fp32")])
def test_dora_weight_copy_follows_the_adapter_dtype(precision, adapter_dtype):
    # with dropout DoRA multiplies its input by weight.to(adapter dtype): a bf16 weight read by bf16 adapters (and
    # no autocast cast to another dtype) is the parameter itself, so nothing weight-sized is kept; the plan counted
    # one per target anyway and read 42.6% over this step (+31.5% on Qwen2.5-0.5B at 1 x 256 tokens against
    # --exact). The fp16-mixed and fp32 cases failed too while the weight norm's temporaries were planned in fp32.
    inputs = PlanInputs(method="dora", precision=precision, adapter_dtype=adapter_dtype, lora_dropout=0.05,
                        seq_len=128, optim="adamw_torch")
    config = dict(SMALL, num_hidden_layers=2)
    real = trace_step(config_from_dict(dict(config)), inputs, real=True).peak_bytes
    planned = estimate(spec_from_config(dict(config), "small-llama"), inputs).allocated_peak_bytes
    assert planned == pytest.approx(real, rel=0.04)


def test_real_trace_refuses_a_4bit_base():
    with pytest.raises(ValueError, match="real=False"):
        trace_step(config_from_dict(dict(SMALL)), PlanInputs(method="qlora"), real=True)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_adapters_without_autocast_match_a_real_step(method, dropout):
    # precision bf16 with an adapter: a bf16 base with Trainer's flags off (or a loop that never autocasts), where
    # PEFT runs its fp32 adapters on an fp32 copy of each target's input; the trace runs it without autocast too
    inputs = PlanInputs(method=method, precision="bf16", optim="adamw_torch", lora_dropout=dropout, seq_len=512)
    assert not inputs.autocast
    real = trace_step(config_from_dict(dict(SMALL)), inputs, real=True).peak_bytes
    planned = estimate(spec_from_config(dict(SMALL), "small-llama"), inputs).allocated_peak_bytes
    assert planned == pytest.approx(real, rel=0.04)


def test_autocast_is_off_only_for_adapters_at_precision_bf16():
    assert not PlanInputs(method="lora", precision="bf16").autocast
    assert PlanInputs(method="lora", precision="bf16-mixed").autocast
    assert PlanInputs(method="full", precision="bf16").autocast  # Trainer's flag over a bf16 model
    assert not PlanInputs(method="qlora", precision="bf16").autocast  # a 4-bit base's bf16 weights, flags off
    assert PlanInputs(method="qlora", precision="bf16-mixed").autocast
    assert not PlanInputs(method="lora", precision="fp32").autocast
    # prepare_model_for_kbit_training's fp32 weights without autocast: the step computes in fp32
    assert PlanInputs(method="qlora", precision="bf16", kbit_upcast=True).compute_dtype_name == "fp32"
    assert PlanInputs(method="qlora", precision="bf16-mixed", kbit_upcast=True).compute_dtype_name == "bf16"
    assert PlanInputs(method="qlora", precision="bf16").compute_dtype_name == "bf16"


@pytest.mark.parametrize("method", ["qlora", pytest.param("qdora", marks=pytest.mark.slow)])  # QDoRA: whole suite only
@pytest.mark.parametrize(("adapter_dtype", "dropout", "kbit_upcast"),
                         [("fp32", 0.05, False), ("fp32", 0.0, False), ("bf16", 0.05, False), ("bf16", 0.0, True)])
def test_a_4bit_base_without_autocast_matches_its_trace(method, adapter_dtype, dropout, kbit_upcast):
    # a 4-bit base with its other weights in bf16 and no autocast (Trainer's flags off, or a hand-written loop): PEFT
    # casts each target's input to the adapters' dtype, fp32 by default, and before PEFT 0.18 also with
    # autocast_adapter_dtype=False (huggingface/peft#2893). Planned under autocast, as it was, the fp32-adapter cases
    # read 11-28% under these traces, the kbit-upcast QDoRA one 11.5% (and a published Llama 3 8B QLoRA run 14%).
    inputs = PlanInputs(method=method, precision="bf16", adapter_dtype=adapter_dtype, lora_dropout=dropout,
                        kbit_upcast=kbit_upcast, seq_len=512, batch_size=2, optim="adamw_torch")
    assert not inputs.autocast  # the trace follows it: this makes the traced step the one without autocast
    traced = trace_step(config_from_dict(dict(SMALL)), inputs).peak_bytes
    planned = estimate(spec_from_config(dict(SMALL), "small-llama"), inputs).allocated_peak_bytes
    assert planned == pytest.approx(traced, rel=0.04)


@pytest.mark.parametrize(("precision", "dropout"), [("bf16-mixed", 0.0), ("bf16-mixed", 0.05), ("bf16", 0.0)])
def test_bf16_adapters_match_a_real_step(precision, dropout):
    # adapter_dtype bf16 (autocast_adapter_dtype=False, TRL's QLoRA cast): without dropout lora_A keeps the input
    # itself, one per norm read (q, k, v share it), where fp32 adapters keep a cast per target (planned as a cast per
    # target, this was 7% under)
    inputs = PlanInputs(method="lora", precision=precision, adapter_dtype="bf16", lora_dropout=dropout, seq_len=512,
                        optim="adamw_torch")
    real = trace_step(config_from_dict(dict(SMALL)), inputs, real=True).peak_bytes
    planned = estimate(spec_from_config(dict(SMALL), "small-llama"), inputs).allocated_peak_bytes
    assert planned == pytest.approx(real, rel=0.04)
