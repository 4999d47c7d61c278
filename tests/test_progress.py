"""Progress bars: drawn on a terminal (or when forced), never when piped or quiet; libraries' bars follow."""

import os
import subprocess
import sys

import pytest

from hf_ftkit import _progress


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv("HF_FTKIT_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    _progress.set_quiet(False)
    yield
    _progress.set_quiet(False)


def test_off_when_not_a_terminal_or_quiet_or_disabled(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _progress.progress_enabled()
    monkeypatch.setenv("HF_FTKIT_PROGRESS", "0")
    assert not _progress.progress_enabled()
    monkeypatch.delenv("HF_FTKIT_PROGRESS")
    _progress.set_quiet(True)
    assert not _progress.progress_enabled()
    _progress.set_quiet(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not _progress.progress_enabled()
    monkeypatch.setenv("HF_FTKIT_PROGRESS", "1")
    assert _progress.progress_enabled()
    monkeypatch.setenv("RANK", "1")  # one bar per run, not one per process
    assert not _progress.progress_enabled()


def test_track_draws_only_when_enabled(capsys, monkeypatch):
    assert list(_progress.track(range(5), "counting")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HF_FTKIT_PROGRESS", "1")
    assert list(_progress.track(iter(range(3)), "counting", total=3)) == [0, 1, 2]
    with _progress.byte_progress("merging") as advance:
        advance(10, 20)
    with _progress.status("converting"):
        pass
    err = capsys.readouterr().err
    assert "counting" in err and "merging" in err and "converting" in err


@pytest.mark.slow
@pytest.mark.parametrize("forced", [False, True])
def test_piped_cli_shows_no_bars_unless_forced(smollm2_dir, adapters, tmp_path, forced):
    (tmp_path / "heldout.txt").write_text(
        "The quick brown fox jumps over the lazy dog. " * 60 + "\n\n" + "Pack my box with five dozen jugs. " * 60)
    env = {**os.environ, "HF_FTKIT_PROGRESS": "1"} if forced else {
        k: v for k, v in os.environ.items()
        if k not in ("HF_FTKIT_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS",
                     "HF_DATASETS_DISABLE_PROGRESS_BARS")}  # the piped CLI must switch them off itself
    result = subprocess.run(
        [sys.executable, "-m", "hf_ftkit", "forgetting", "--base", str(smollm2_dir), "--model",
         str(adapters["task_a"]), "--data", str(tmp_path / "heldout.txt"), "--max-tokens", "512", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if forced:
        assert "forgetting: scoring held-out text" in result.stderr
    else:
        assert "forgetting:" not in result.stderr
        assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr  # tqdm bars are off too
