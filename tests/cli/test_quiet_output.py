"""Normal output carries no third-party noise a user cannot act on; --verbose shows it."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from hf_ftkit.cli.main import NOISE_LOGS, _hide_library_noise
from tests.conftest import build_adapter


@pytest.mark.parametrize(("name", "prefix"), list(NOISE_LOGS.items()))
def test_known_notices_are_dropped_and_others_kept(caplog, name, prefix):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hide_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated.", FutureWarning, stacklevel=1)
        warnings.warn("something real", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something real"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger(name).warning(f"{prefix}: No module named 'kernels'")
        logging.getLogger(name).warning("a real library warning")
    assert [r.getMessage() for r in caplog.records] == ["a real library warning"]


@pytest.mark.slow  # a subprocess or a full docs rebuild: the whole suite (CI) runs it
def test_a_merge_prints_no_library_noise_unless_verbose(tiny_model_dir, tmp_path):
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter", 0, r=4, target_modules=["q_proj"])
    code = ("import sys; from hf_ftkit.cli.main import main; "
            "sys.exit(main(['merge', sys.argv[1], sys.argv[2], '--out', sys.argv[3], '--no-verify'] + sys.argv[4:]))")
    quiet = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(adapter), str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "kernels-community" not in quiet.stderr and "is_gradient_checkpointing" not in quiet.stderr
    verbose = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(adapter), str(tmp_path / "v"),
                              "--verbose"], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "is_gradient_checkpointing" in verbose.stderr
