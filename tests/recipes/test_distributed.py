"""``hf-ftkit train`` under torchrun (gloo, 2 CPU processes) with DDP and with FSDP, and preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.recipes.conftest import ROOT, write_recipe

# torchrun tests share one worker: two at once oversubscribe the cores (see pyproject's addopts)
pytestmark = pytest.mark.xdist_group("torchrun")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(recipe, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "hf_ftkit", "train", "--config", str(recipe), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_train_runs_under_torchrun_with_two_processes(tmp_path, tiny_model_dir, mode):
    extra = {"ddp": {"shard": "ddp"},
             "fsdp": {"shard": "fsdp", "fsdp": "full_shard auto_wrap",
                      "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}}[mode]
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), max_steps=4,
                        per_device_train_batch_size=2, **extra)
    done = _torchrun(path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert summary["plan"]["inputs"]["shard"] == mode and summary["final"]["train_loss"] is not None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "done: 4 steps" in done.stdout  # printed once, by rank 0
    assert done.stdout.count("done: 4 steps") == 1


def _run_until_logged(cmd: list[str], steps: int) -> subprocess.Popen:
    """Start ``cmd`` and return once it has logged ``steps`` training steps (one log line per step)."""
    process = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen, deadline = 0, time.time() + 300
    assert process.stdout is not None
    for line in process.stdout:
        if "'loss'" in line:
            seen += 1
            if seen >= steps:
                return process
        assert time.time() < deadline, "the run never reached its first steps"
    raise AssertionError(f"the run ended before logging {steps} steps")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    common = {"model_name_or_path": str(tiny_model_dir), "max_steps": 24, "save_strategy": "steps",
              "save_steps": 10, "per_device_train_batch_size": 2}
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole = write_recipe(tmp_path / "whole" / "r.yaml", **common)
    cut = write_recipe(tmp_path / "cut" / "r.yaml", **common)
    cli = [sys.executable, "-m", "hf_ftkit", "train", "--config"]
    subprocess.run([*cli, str(whole)], cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)

    process = _run_until_logged([*cli, str(cut)], steps=3)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 130, rest[-2000:]  # preempted: the "interrupted" exit code
    out = tmp_path / "cut" / "out"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "preempted" and summary["preempted_by"] == "SIGTERM"
    stopped = summary["global_step"]
    assert 3 <= stopped < 20 and (out / f"checkpoint-{stopped}").is_dir()
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a cut run

    # a plain rerun of the cut folder is refused (tests/recipes/test_loading.py); --resume continues it
    subprocess.run([*cli, str(cut), "--resume"], cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    resumed = json.loads((out / "run_summary.json").read_text())
    reference = json.loads((tmp_path / "whole" / "out" / "run_summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith(f"checkpoint-{stopped}")
    assert resumed["global_step"] == reference["global_step"] == 24
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert stopped in checkpoints and 20 in checkpoints  # the preemption checkpoint is kept, the schedule went on
    assert resumed["final"]["last_logged_loss"] == pytest.approx(reference["final"]["last_logged_loss"], rel=1e-3)
