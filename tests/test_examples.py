"""The examples run as users run them, and their TensorBoard event files carry hf-ftkit's scalars."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


@pytest.mark.slow
def test_plain_trainer_example_logs_memory_and_forgetting_to_tensorboard(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_trainer.py"), "--model", str(smollm2_dir), "--output-dir", str(out),
         "--max-steps", "6", "--report-to", "tensorboard", "--heldout-tokens", "2048"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logged = scalars(out / "runs")
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 1  # nothing logged after the writer closed
    peak = logged["train/memory/cpu_peak_rss_gib"]  # a CPU run: RSS under its own key, no error vs the GPU plan
    assert peak and all(value > 0.1 for _, value in peak)
    assert "train/memory/planned_gib" in logged and "train/memory/plan_error_pct" not in logged
    bpb = dict(logged["train/forgetting/bits_per_byte"])
    assert sorted(bpb) == [0, 6]  # the baseline before step 0 and the final measurement
    assert 0.3 < bpb[0] < 2.0  # bits per byte of a pretrained LM on English prose and code docs
    kl = dict(logged["train/forgetting/kl"])
    assert kl[0] == 0 and kl[6] > 0  # the base against itself, then a tuned adapter
    assert dict(logged["train/forgetting/bits_per_byte_delta_pct"])[0] == 0
    assert (out / "forgetting.json").is_file() and (out / "forgetting.png").is_file()
