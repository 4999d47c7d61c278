import json
import subprocess
import sys

import pytest

from hf_ftkit.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_schema(capsys):
    code, out, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--budget", "24GiB", "--json",
                       "--gradient-checkpointing")
    data = json.loads(out)
    assert code == 0
    for key in ("peak_bytes", "breakdown", "fits", "inputs", "suggestions", "budget_bytes", "headroom_bytes"):
        assert key in data
    assert data["fits"] is True and data["inputs"]["method"] == "qlora"
    assert sum(data["breakdown"].values()) == data["peak_bytes"]


def test_table_shows_breakdown_verdict_and_suggestions(capsys):
    code, out, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--budget", "24GiB")
    assert code == 0
    for text in ("optimizer states", "peak per device", "does NOT fit", "QLoRA", "gradient checkpointing"):
        assert text in out


def test_check_exits_1_when_it_does_not_fit(capsys):
    code, _, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--budget", "24GiB", "--check")
    assert code == 1
    code, _, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--gradient-checkpointing",
                     "--budget", "24GiB", "--check")
    assert code == 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--budget", "24 bananas"], "--budget"),
        (["--optim", "adamw_turbo"], "--optim"),
        (["--method", "lorax"], "--method"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "-1"], "--seq-len"),
        (["--budget", "rtx9999"], "known GPUs"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(capsys, argv, needle):
    code, out, err = run(capsys, "plan", "meta-llama/Llama-3.1-8B", *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_argparse_errors_exit_2_and_help_exits_0(capsys):
    assert main(["plan", "meta-llama/Llama-3.1-8B", "--method", "lorax"]) == 2
    assert main(["--help"]) == 0
    assert "hf-ftkit" in capsys.readouterr().out


def test_unknown_model_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "plan", "someone/not-a-model")
    assert code == 2 and "catalog" in err and "config.json" in err


def test_seq_len_past_context_warns(capsys):
    code, _, err = run(capsys, "plan", "openai-community/gpt2", "--seq-len", "4096")
    assert code == 0 and "context of 1024" in err


def test_what_fits_and_list_models(capsys):
    code, out, _ = run(capsys, "plan", "Qwen/Qwen2.5-7B", "--budget", "a100-80gb", "--what-fits", "--json")
    rows = json.loads(out)["what_fits"]
    assert code == 0 and {r["method"] for r in rows} == {"full", "lora", "dora", "qlora", "qdora"}
    code, out, _ = run(capsys, "plan", "--list-models")
    assert "meta-llama/Llama-3.1-405B" in out


def test_plot_writes_a_png(capsys, tmp_path):
    target = tmp_path / "plan.png"
    code, _, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--budget", "h100", "--plot", str(target))
    assert code == 0 and target.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--plot", str(tmp_path / "no" / "x.png"))
    assert code == 2 and "does not exist" in err


def test_console_script_and_help_examples():
    out = subprocess.run([sys.executable, "-m", "hf_ftkit.cli.main", "plan", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "examples:" in out and "--budget" in out
    done = subprocess.run(["hf-ftkit", "plan", "meta-llama/Llama-3.1-405B", "--json"], capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout)["model"] == "meta-llama/Llama-3.1-405B"


def test_exact_traces_a_local_config(capsys, tmp_path, tiny_llama_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config))
    code, out, _ = run(capsys, "plan", str(tmp_path), "--method", "lora", "--seq-len", "128", "--exact", "--json")
    data = json.loads(out)
    assert code == 0 and data["peak_phase"] == "traced" and data["allocated_peak_bytes"] > 0
    code, _, err = run(capsys, "plan", str(tmp_path), "--gpus", "2", "--exact")
    assert code == 2 and "--exact traces one device" in err


def test_a_model_the_tracer_cannot_run_is_one_sentence_under_exact(capsys, tmp_path, tiny_llama_config,
                                                                  monkeypatch):
    import hf_ftkit.planner.trace as trace

    def fails(*args, **kwargs):
        raise RuntimeError("Attempting to broadcast a dimension of length 768 at -1!\nmore torch detail")

    monkeypatch.setattr(trace, "trace_step", fails)
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config))
    code, out, err = run(capsys, "plan", str(tmp_path), "--exact")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--exact could not trace" in err and "RuntimeError" in err and "plan it without --exact" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "lora", "--lora-targets", "qproj"], "matches no linear layer"),
        (["--budget", "0.0000001"], "less than any GPU has"),
    ],
)
def test_plans_that_cannot_be_meant_are_refused(capsys, argv, needle):
    code, _, err = run(capsys, "plan", "meta-llama/Llama-3.1-8B", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "full", "--lora-r", "8"], "--lora-r has no effect with --method full"),
        (["--method", "lora", "--modules-to-save", "scorer"], "--modules-to-save scorer matches no module"),
        (["--method", "full", "--shard", "zero3", "--gpus", "1"], "--shard zero3 on one GPU shards nothing"),
    ],
)
def test_plans_that_are_probably_not_meant_warn_in_table_and_json(capsys, argv, needle):
    code, _, err = run(capsys, "plan", "meta-llama/Llama-3.1-8B", *argv)
    assert code == 0 and needle in err
    code, out, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", *argv, "--json")
    assert any(needle in w for w in json.loads(out)["warnings"])


def test_a_config_holding_only_model_type_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    code, _, err = run(capsys, "plan", str(tmp_path))
    assert code == 2 and "gives no model size" in err


@pytest.mark.parametrize(("budget", "seq_len"), [("24GiB", "1024"), ("20GiB", "4096")])
def test_suggestions_include_what_auto_picks_and_ways_to_keep_full_finetuning(capsys, budget, seq_len):
    from hf_ftkit.fallback.ladder import choose_setup
    from hf_ftkit.planner.inputs import PlanInputs

    code, out, _ = run(capsys, "plan", "meta-llama/Llama-3.1-8B", "--budget", budget, "--seq-len", seq_len, "--json")
    rows = json.loads(out)["suggestions"]
    picked = choose_setup("meta-llama/Llama-3.1-8B", budget, PlanInputs(seq_len=int(seq_len)))
    assert any(r["peak_bytes"] == picked.plan.peak_bytes and r["fits"] for r in rows)
    keeping = [r for r in rows if "method" not in r["settings"]]
    assert len(keeping) >= 2 and any("gradient_checkpointing" in r["settings"] for r in keeping)
    assert any(r["settings"].get("offload") == "optimizer" for r in keeping)
