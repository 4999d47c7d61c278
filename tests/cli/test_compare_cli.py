import json
import os

import pytest

from hf_ftkit.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_every_method_and_column(capsys):
    code, out, _ = run(capsys, "compare", "meta-llama/Llama-3.1-8B", "--gpu", "a100-80gb", "--tokens", "50M",
                       "--price-per-gpu-hour", "2", "--batch-size", "2", "--seq-len", "1024", "--json")
    data = json.loads(out)
    assert code == 0 and data["tokens"] == 50_000_000 and data["batch_size"] == 2 and data["seq_len"] == 1024
    assert list(data["methods"]) == ["full", "lora", "dora", "qlora", "qdora"]
    for row in data["methods"].values():
        for key in ("trainable_params", "trainable_pct", "min_gpus", "shard", "peak_bytes_per_gpu", "hours", "cost",
                    "artifact_bytes", "checkpoint_bytes", "deployment", "composability", "forgetting_risk", "basis"):
            assert key in row
        assert row["peak_bytes_per_gpu"] <= data["gpu"]["memory_bytes"]
        assert row["cost"] == pytest.approx(row["gpu_hours"] * 2)
        assert set(row["basis"].values()) <= {"planned", "estimated", "literature", "measured"}
        assert row["basis"]["forgetting_risk"] == "literature"  # as the table labels it
    assert data["assumptions"]


def test_table_labels_numbers_and_prints_assumptions(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "280")
    plot = tmp_path / "compare.png"
    code, out, _ = run(capsys, "compare", "meta-llama/Llama-3.1-70B", "--gpu", "h100", "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    for text in ("Full FT", "QLoRA", "fewest GPUs", "planned", "estimated", "Assumptions:", "utilisation",
                 "needs --price-per-gpu-hour"):
        assert text in out


def test_quiet_prints_nothing_but_json_still_prints(capsys):
    code, out, err = run(capsys, "compare", "meta-llama/Llama-3.1-8B", "--quiet")
    assert code == 0 and out == "" and err == ""
    code, out, _ = run(capsys, "compare", "meta-llama/Llama-3.1-8B", "--quiet", "--json")
    assert json.loads(out)["model"] == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize("argv, words", [
    (["--gpu", "rtx9090"], "known GPUs: a10, a100-40gb"),
    (["--tokens", "0"], "--tokens must be greater than zero"),
    (["--tokens", "lots"], "is not a count"),
    (["--price-per-gpu-hour", "-3"], "--price-per-gpu-hour must be zero or more"),
    (["--forgetting", "lora"], "must look like lora=report.json"),
])
def test_bad_input_exits_2_with_one_sentence(capsys, argv, words):
    code, out, err = run(capsys, "compare", "meta-llama/Llama-3.1-8B", *argv)
    assert code == 2 and out == ""
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_piped_output_has_no_colour_codes_and_keeps_the_table():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # a set COLUMNS is the user's width: obeyed
    result = subprocess.run([sys.executable, "-m", "hf_ftkit", "compare", "meta-llama/Llama-3.1-70B", "--gpu", "h100",
                             "--price-per-gpu-hour", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stderr == ""
    assert "\x1b[" not in result.stdout  # rich degrades to plain text when stdout is not a terminal
    assert "fewest GPUs" in result.stdout and "1x h100" in result.stdout
