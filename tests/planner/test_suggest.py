from hf_ftkit.planner.api import plan
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.suggest import suggest, what_fits
from hf_ftkit.units import GIB


def test_suggestions_are_real_plans_that_save_what_they_say():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    p = plan(spec, PlanInputs(method="lora", batch_size=2, seq_len=2048), budget="24GiB")
    assert p.fits is False
    tips = suggest(spec, p)
    assert tips and tips[0].fits  # fitting changes come first
    for tip in tips:
        alt = estimate(spec, p.inputs.replace(**tip.changes))
        assert tip.saves_bytes == p.peak_bytes - alt.peak_bytes > 0


def test_smaller_micro_batch_keeps_the_effective_batch():
    spec = resolve_model("Qwen/Qwen2.5-7B")
    p = plan(spec, PlanInputs(method="qlora", batch_size=8, gradient_accumulation_steps=2, seq_len=2048))
    micro = [t for t in suggest(spec, p, limit=20) if "micro-batch" in t.label]
    assert micro
    for tip in micro:
        assert tip.changes["batch_size"] * tip.changes["gradient_accumulation_steps"] == 16


def test_what_fits_is_the_boundary():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    budget = 24 * GIB
    base = PlanInputs(seq_len=2048)
    for row in what_fits(spec, base, budget):
        inputs = base.replace(method=row.method, gradient_checkpointing=row.gradient_checkpointing)
        if row.max_batch_size:
            assert estimate(spec, inputs.replace(batch_size=row.max_batch_size)).peak_bytes <= budget
            if row.max_batch_size < 1024:
                assert estimate(spec, inputs.replace(batch_size=row.max_batch_size + 1)).peak_bytes > budget
        else:
            assert estimate(spec, inputs.replace(batch_size=1)).peak_bytes > budget
    full = [r for r in what_fits(spec, base, budget) if r.method == "full"]
    assert all(r.max_batch_size == 0 for r in full)  # 8B full FT never fits 24 GiB


def test_sequence_past_the_context_warns_and_is_recorded():

    import warnings

    from hf_ftkit.errors import HfFtkitWarning

    with warnings.catch_warnings(record=True) as caught:  # GPT-2 also warns that its layers were traced
        warnings.simplefilter("always", HfFtkitWarning)
        p = plan("openai-community/gpt2", seq_len=4096)
    assert any("context of 1024" in str(w.message) for w in caught if issubclass(w.category, HfFtkitWarning))
    assert any("context of 1024" in w for w in p.warnings) and p.inputs.seq_len == 4096


def test_kbit_upcast_costs_the_fp32_copy_of_non_quantized_weights():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    base = estimate(spec, PlanInputs(method="qlora")).breakdown["weights"]
    upcast = estimate(spec, PlanInputs(method="qlora", kbit_upcast=True)).breakdown["weights"]
    assert upcast - base == 2 * (spec.params_total - spec.params_linear)


def test_suggestions_are_distinct_real_changes():
    spec = resolve_model("meta-llama/Llama-3.1-70B")
    p = plan(spec, PlanInputs(method="full", gpus=8, nodes=2, shard="fsdp", gradient_checkpointing=True))
    changes = [tip.changes for tip in suggest(spec, p, limit=50)]
    assert len(changes) == len({tuple(sorted(c.items())) for c in changes})
    assert all("gradient_checkpointing" not in c for c in changes)  # already on
