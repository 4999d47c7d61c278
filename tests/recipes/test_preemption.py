"""Preemption with the forgetting check on: SIGTERM saves within seconds (no measurement first), the CLI exits
130, and ``--resume`` continues the step-0 baseline and the history instead of measuring a new baseline."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from transformers import TrainerCallback

from hf_ftkit.cli.main import main
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
from tests.recipes.conftest import write_recipe

SLOW_MEASUREMENT_S = 30.0  # what one measurement costs a large model on a big held-out set


class _SignalAt(TrainerCallback):
    """Sends SIGTERM to this process at the end of step ``at`` and records when things happened."""

    def __init__(self, at: int) -> None:
        self.at, self.times, self.saved_at = at, {}, None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times[state.global_step] = time.monotonic()
        if state.global_step == self.at:
            self.signalled = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saved_at = time.monotonic()


@pytest.fixture()
def slow_measurements(monkeypatch):
    """Every measurement after the baseline takes SLOW_MEASUREMENT_S, as on a real model."""
    original, switch = ForgettingEvaluator.measure, {"slow": True}

    def slow(self, model, step, **kwargs):
        if switch["slow"] and not kwargs.get("baseline"):
            time.sleep(SLOW_MEASUREMENT_S)
        return original(self, model, step, **kwargs)

    monkeypatch.setattr(ForgettingEvaluator, "measure", slow)
    return switch


def _with_callback(monkeypatch, callback: TrainerCallback) -> None:
    import hf_ftkit.recipes.run as run

    original = run._Run.make_trainer

    def make_trainer(self, setup, folder):
        trainer = original(self, setup, folder)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(run._Run, "make_trainer", make_trainer)


@pytest.mark.slow  # a subprocess or a full docs rebuild: the whole suite (CI) runs it
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigterm_saves_first_exits_130_and_resume_keeps_the_baseline(tmp_path, tiny_model_dir, monkeypatch,
                                                                       slow_measurements, method):
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), method=method,
                        forgetting_data="stdlib", forgetting_max_tokens=512, forgetting_every=1000, max_steps=8)
    watcher = _SignalAt(3)
    _with_callback(monkeypatch, watcher)
    assert main(["train", "--config", str(path)]) == 130
    out = tmp_path / "out"
    stopped = max(watcher.times)
    assert stopped == 4 and (out / "checkpoint-4").is_dir()  # the step in flight finished, then the save
    assert watcher.saved_at is not None and watcher.saved_at - watcher.times[stopped] < 10
    assert watcher.saved_at - watcher.signalled < 10 + (watcher.times[4] - watcher.times[3])
    history = json.loads((out / "forgetting.json").read_text())["history"]
    assert [e["step"] for e in history] == [0]  # no measurement at the preemption
    kept = json.loads((out / "checkpoint-4" / "hf_ftkit_forgetting.json").read_text())
    assert kept["history"][0]["baseline"] and kept["history"][0]["step"] == 0

    slow_measurements["slow"] = False
    _with_callback(monkeypatch, _SignalAt(-1))
    assert main(["train", "--config", str(path), "--resume"]) == 0
    report = json.loads((out / "forgetting.json").read_text())
    assert [(e["step"], e["baseline"]) for e in report["history"]] == [(0, True), (8, False)]
    final = report["history"][-1]
    assert final["kl"] is not None and final["kl"] > 0  # KL against the step-0 base, for full FT from the kept top-k
    assert final["bits_per_byte_delta"] == pytest.approx(final["bits_per_byte"] - history[0]["bits_per_byte"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["forgetting"]["baseline"]["step"] == 0

