import subprocess
import sys

import pytest

import hf_ftkit

EXPECTED = [
    "BadInputError", "DoesNotFitError", "HfFtkitError", "HfFtkitWarning", "LadderLimits", "MemoryBudgetCallback",
    "ModelNotFoundError",
    "ModelSpec", "Setup", "choose_setup",
    "Plan", "PlanInputs", "__version__", "parse_budget", "plan", "plan_from_training", "resolve_model",
    "suggest", "trace_step", "train_with_fallback", "what_fits",
    "AdapterSet", "Composition", "MergeConfig", "MergeResult", "MergeVerificationError", "QloraTarget", "compose",
    "inspect_adapters", "merge_adapters",
    "ForgettingCallback", "ForgettingEvaluator", "measure_forgetting", "stdlib_documents",
    "Comparison", "compare_methods", "add_callbacks",
]


def test_all_is_pinned_and_sorted():
    assert hf_ftkit.__all__ == sorted(EXPECTED)


def test_every_public_name_resolves():
    for name in hf_ftkit.__all__:
        assert getattr(hf_ftkit, name) is not None


@pytest.mark.parametrize("call", [
    "p = hf_ftkit.plan('meta-llama/Llama-3.1-8B', method='qlora'); assert p.peak_bytes > 0",
    "c = hf_ftkit.compare_methods('meta-llama/Llama-3.1-70B', gpu='h100'); assert c.rows['qlora'].placement.gpus == 1",
])
def test_planning_and_comparing_do_not_import_torch(call):
    code = f"import sys, hf_ftkit; {call}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv", [
    ["plan", "meta-llama/Llama-3.1-405B", "--json"],
    ["compare", "meta-llama/Llama-3.1-8B", "--json"],
    ["plan", "--list-models"],
    ["--help"],
    ["merge", "--help"],
])
def test_cli_plan_compare_and_help_import_no_torch_transformers_or_peft(argv):
    code = ("import sys; from hf_ftkit.cli.main import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-500:]


def test_a_json_plan_from_the_catalog_loads_neither_rich_nor_the_hub_download_client():
    """Both cost more than the plan itself in a cold process (start-up is measured in docs/benchmarks/planner.md)."""
    code = ("import sys; from hf_ftkit.cli.main import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('rich.console', 'huggingface_hub.file_download') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "plan", "meta-llama/Llama-3.1-405B", "--json"],
                         capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-500:]
