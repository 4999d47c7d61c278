import pytest

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


def test_a_padded_batch_is_offered_padding_free_batches_with_flash_attention():
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    padded = plan(spec, PlanInputs(method="lora", batch_size=4, seq_len=4096), budget="80GiB")
    flat = {"padding_free": True, "attn_implementation": "flash_attention_2"}
    tip = next(t for t in suggest(spec, padded, limit=30) if t.changes == flat)
    alt = estimate(spec, padded.inputs.replace(**flat))
    assert tip.saves_bytes == padded.peak_bytes - alt.peak_bytes
    # allocated: the boolean mask, each layer's bf16 copy of it and k and v repeated from 8 to 32 heads
    tokens = 4 * 4096
    saved = 4 * 4096 * 4096 + 32 * tokens * (2 * 4096 + 2 * 2 * (4096 - 1024))
    assert padded.allocated_peak_bytes - alt.allocated_peak_bytes == saved
    for unpadded in ({"packing": True}, {"batch_size": 1}, {"attn_implementation": "flash_attention_2"}):
        p = plan(spec, padded.inputs.replace(**unpadded), budget="80GiB")
        assert all("padding_free" not in t.changes for t in suggest(spec, p, limit=30)), unpadded


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


CASES = [
    ("meta-llama/Llama-3.1-405B", PlanInputs(), None),
    ("meta-llama/Llama-3.1-8B", PlanInputs(), "24GiB"),
    ("meta-llama/Llama-3.1-8B", PlanInputs(method="lora", batch_size=4, seq_len=4096), "80GiB"),
    ("meta-llama/Llama-3.1-70B", PlanInputs(method="lora", batch_size=4), "80GiB"),
    ("Qwen/Qwen2.5-7B", PlanInputs(precision="fp32", batch_size=8), "h100"),
    ("Qwen/Qwen2.5-0.5B", PlanInputs(gradient_checkpointing=True, optim="paged_adamw_8bit"), "8GiB"),
    ("mistralai/Mixtral-8x7B-v0.1", PlanInputs(gpus=8, shard="zero2", batch_size=2), "80GiB"),
    ("meta-llama/Llama-3.2-3B", PlanInputs(method="qlora", batch_size=16), "16GiB"),
    ("HuggingFaceTB/SmolLM2-135M", PlanInputs(batch_size=2), "1000GiB"),  # everything fits
]


def _every_candidate_replayed(spec, p):
    from hf_ftkit.planner.suggest import Suggestion, _candidates, select

    every = []
    for label, wanted in _candidates(p.inputs):
        changes = {k: v for k, v in wanted.items() if getattr(p.inputs, k) != v}
        if not changes or changes in [s.changes for s in every]:
            continue
        alt = estimate(spec, p.inputs.replace(**changes), p.budget_bytes)
        every.append(Suggestion(label, changes, alt.peak_bytes, p.peak_bytes - alt.peak_bytes, alt.fits))
    return every, select([s for s in every if s.saves_bytes > 0], p.inputs.is_peft, 6)


@pytest.mark.parametrize(("model", "inputs", "budget"), CASES, ids=[f"{m}-{b}" for m, _, b in CASES])
def test_candidates_left_unreplayed_could_not_have_been_shown(model, inputs, budget, monkeypatch):
    """suggest() replays only candidates whose allocated-peak bound can reach the list; the list must be
    the one that replaying every candidate gives, with fewer replays on a model where the bounds are far apart."""
    import hf_ftkit.planner.suggest as suggest_module

    spec = resolve_model(model)
    p = plan(spec, inputs, budget=budget)
    every, expected = _every_candidate_replayed(spec, p)
    replays = []
    real = suggest_module.estimate
    monkeypatch.setattr(suggest_module, "estimate",
                        lambda *a, slack=True, **k: replays.append(slack) or real(*a, slack=slack, **k))
    assert suggest(spec, p) == expected
    assert sum(replays) <= len(every)
    if model.endswith("405B"):
        assert sum(replays) < len(every) - 2


def test_the_pruned_list_matches_replaying_every_candidate_near_the_budget():
    """Budgets at and around each plan's own peak put candidates on both sides of "fits", where a bound
    that pruned too much would change the list."""
    import itertools

    mismatches = []
    for model, (method, gc, batch) in itertools.product(
            ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-70B"),
            itertools.product(("full", "lora", "qlora"), (False, True), (1, 4))):
        spec = resolve_model(model)
        inputs = PlanInputs(method=method, gradient_checkpointing=gc, batch_size=batch, seq_len=1024)
        peak = estimate(spec, inputs).peak_bytes
        for factor in (None, 0.3, 0.6, 0.9):
            p = plan(spec, inputs, budget=None if factor is None else int(peak * factor))
            if suggest(spec, p) != _every_candidate_replayed(spec, p)[1]:
                mismatches.append((model, method, gc, batch, factor))
    assert not mismatches
