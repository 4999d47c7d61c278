"""Gradients in flight inside a layer's backward: with checkpointing and wide MLPs they decide the peak.

Derived from traced steps of 70B-shaped Llama layers (the calibration shape below); held out: a
Qwen2.5-7B-shaped QLoRA step and a Phi-3-shaped one, never used to shape the formula."""

from __future__ import annotations

import pytest

from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.structure import config_from_dict, spec_from_config
from hf_ftkit.planner.trace import trace_step

LLAMA_70B_2L = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
                    num_attention_heads=64, num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False)
QWEN_7B_4L = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
PHI3_4L = dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=4,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, pad_token_id=0)
GC = dict(gradient_checkpointing=True, precision="bf16-mixed")


def _error(config: dict, inputs: PlanInputs) -> float:
    spec = spec_from_config(dict(config), config["model_type"])
    traced = trace_step(config_from_dict(dict(config)), inputs).peak_bytes
    return estimate(spec, inputs).allocated_peak_bytes / traced - 1


@pytest.mark.slow
@pytest.mark.parametrize("config, inputs", [
    # calibration: the adapter's dropout on down_proj's 28672-wide input, and without it
    # (unmasked batches: flash attention, traced as SDPA on two rows without a mask; TRL's packing runs one
    # padding-free row that SDPA masks)
    (LLAMA_70B_2L, PlanInputs(method="lora", batch_size=2, seq_len=2048, attn_implementation="flash_attention_2",
                              lora_r=8, lora_dropout=0.1, **GC)),
    (LLAMA_70B_2L, PlanInputs(method="lora", batch_size=2, seq_len=2048, attn_implementation="flash_attention_2",
                              lora_r=8, lora_dropout=0.0, lora_targets="down_proj", **GC)),
    # held out
    (QWEN_7B_4L, PlanInputs(method="qlora", batch_size=2, seq_len=1024, lora_dropout=0.1, **GC)),
    (PHI3_4L, PlanInputs(method="lora", batch_size=4, seq_len=1024, lora_dropout=0.05, **GC)),
], ids=["llama70b-all-linear", "llama70b-down-no-dropout", "qwen7b-qlora", "phi3-lora"])
def test_checkpointed_adapter_steps_plan_at_most_3_percent_under_5_over_a_trace(config, inputs):
    # before the in-flight gradients were counted the first two planned 23% and 18% low. Those two read +3.8% and
    # +4.4% (over) since the trace lost the packed-sequence mask fake tensors made transformers build (against
    # that trace they read within 3%): none may be under by more than 3%, nor over by more than 5%
    assert -0.03 < _error(config, inputs) < 0.05


def test_4bit_constants_are_on_every_rank_and_stay_on_the_device_under_offload(tiny_llama_spec):
    one = estimate(tiny_llama_spec, PlanInputs(method="qlora", quant_storage="bf16", seq_len=256))
    constants = one.breakdown["quant_constants"]
    assert constants > 0
    for shard in ("fsdp", "zero3"):
        sharded = estimate(tiny_llama_spec, one.inputs.replace(gpus=4, shard=shard))
        offloaded = estimate(tiny_llama_spec, one.inputs.replace(gpus=4, shard=shard, offload="params"))
        # bitsandbytes keeps them in quant_state (neither parameter nor buffer): not sharded, not offloaded
        assert sharded.breakdown["quant_constants"] == offloaded.breakdown["quant_constants"] == constants
        assert sharded.breakdown["weights"] < one.breakdown["weights"] / 3 and offloaded.breakdown["weights"] == 0
