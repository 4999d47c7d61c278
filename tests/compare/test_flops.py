"""FLOPs per token, checked against counts written out by hand from each config's dimensions."""

import pytest

from hf_ftkit.compare.flops import flops_per_token
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model

# Llama-3.1-8B's config.json: hidden 4096, intermediate 14336, 32 layers, 32 heads of 128, 8 KV heads,
# vocabulary 128256, untied LM head.
H, FF, L, Q, KV, V = 4096, 14336, 32, 4096, 1024, 128256
LINEARS = {"q": (H, Q), "k": (H, KV), "v": (H, KV), "o": (Q, H), "gate": (H, FF), "up": (H, FF), "down": (FF, H)}
MATMUL = L * sum(a * b for a, b in LINEARS.values()) + H * V  # decoder linears + LM head
ATTN_FWD = lambda s: 2 * L * Q * s  # noqa: E731  causal QK^T and AV: 4·q per key over s/2 keys, per layer


@pytest.fixture(scope="module")
def llama8b():
    return resolve_model("meta-llama/Llama-3.1-8B")


def adapter(r):
    return L * r * sum(a + b for a, b in LINEARS.values())


@pytest.mark.parametrize("seq_len", [512, 2048, 8192])
def test_full_fine_tuning_is_six_n_plus_attention(llama8b, seq_len):
    flops = flops_per_token(llama8b, PlanInputs(method="full", seq_len=seq_len))
    assert flops.total == pytest.approx(6 * MATMUL + 3 * ATTN_FWD(seq_len), rel=1e-12)
    # the familiar rule of thumb: within a few percent of 6·N at short context
    assert flops.total / (6 * llama8b.params_total) == pytest.approx(1, abs=0.1)


def test_lora_skips_weight_gradients_and_adds_adapter_flops(llama8b):
    flops = flops_per_token(llama8b, PlanInputs(method="lora", lora_r=16, seq_len=2048))
    assert flops.total == pytest.approx(4 * MATMUL + 3 * ATTN_FWD(2048) + 6 * adapter(16), rel=1e-12)
    full = flops_per_token(llama8b, PlanInputs(method="full", seq_len=2048))
    assert 0.66 < flops.total / full.total < 0.72  # ~2/3 of full FT, not 1/100


def test_gradient_checkpointing_adds_one_forward(llama8b):
    for method, extra in (("full", 2 * MATMUL + ATTN_FWD(1024)),
                          ("lora", 2 * MATMUL + ATTN_FWD(1024) + 2 * adapter(8))):
        plain = flops_per_token(llama8b, PlanInputs(method=method, lora_r=8, seq_len=1024))
        ckpt = flops_per_token(llama8b, PlanInputs(method=method, lora_r=8, seq_len=1024,
                                                   gradient_checkpointing=True))
        assert ckpt.total - plain.total == pytest.approx(extra, rel=1e-12)


def test_qlora_adds_dequantization_per_micro_batch(llama8b):
    lora = flops_per_token(llama8b, PlanInputs(method="lora", batch_size=2, seq_len=1024))
    qlora = flops_per_token(llama8b, PlanInputs(method="qlora", batch_size=2, seq_len=1024))
    decoder = L * sum(a * b for a, b in LINEARS.values())
    # forward + backward dequantize every 4-bit weight, 2 operations each, once per micro-batch of 2 x 1024
    assert qlora.total - lora.total == pytest.approx(2 * 2 * decoder / 2048, rel=1e-12)
    ckpt = flops_per_token(llama8b, PlanInputs(method="qlora", batch_size=2, seq_len=1024,
                                               gradient_checkpointing=True))
    assert ckpt.dequant == pytest.approx(3 * 2 * decoder / 2048, rel=1e-12)


def test_dora_adds_the_weight_norm(llama8b):
    lora = flops_per_token(llama8b, PlanInputs(method="lora", lora_r=16, seq_len=2048))
    dora = flops_per_token(llama8b, PlanInputs(method="dora", lora_r=16, seq_len=2048))
    decoder = L * sum(a * b for a, b in LINEARS.values())
    assert dora.total - lora.total == pytest.approx((2 * 16 + 3) * decoder / 2048, rel=1e-12)


def test_moe_counts_only_the_active_experts():
    spec = resolve_model("mistralai/Mixtral-8x7B-v0.1")  # 8 experts, 2 per token
    flops = flops_per_token(spec, PlanInputs(method="full", seq_len=2048))
    dense_equivalent = 6 * spec.params_total
    assert flops.total < 0.45 * dense_equivalent  # ~13B of 47B parameters are active
    experts = spec.params_total - spec.params_embedding - spec.params_lm_head - spec.params_linear
    active = spec.params_linear + experts * 2 / 8 + spec.params_lm_head
    assert flops.base_matmul == pytest.approx(6 * active, rel=1e-12)
