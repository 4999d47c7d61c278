from __future__ import annotations

import json
from importlib import metadata

import torch

from hf_ftkit.cli.main import main


def test_env_json_reports_versions_build_and_devices(capsys):
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["libraries"]["torch"] == metadata.version("torch")
    assert facts["libraries"]["peft"] == metadata.version("peft")
    assert facts["torch_build"]["version"] == torch.__version__
    assert len(facts["gpus"]) == torch.cuda.device_count()
    assert facts["cpu_count"] >= 1 and facts["ram_bytes"] > 0
    assert main(["env"]) == 0 and "torch build" in capsys.readouterr().out


def test_version_flag(capsys):
    import hf_ftkit

    try:
        main(["--version"])
    finally:
        assert f"hf-ftkit {hf_ftkit.__version__}" in capsys.readouterr().out
