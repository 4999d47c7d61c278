"""Under torchrun (gloo, 2 processes) the sharded, all-reduced numbers equal the single-process ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]  # torchrun tests share one worker


def test_two_ranks_equal_one_process(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
    from hf_ftkit.forgetting.heldout import Document, stdlib_documents

    script = Path(__file__).with_name("ddp_measure.py")
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(smollm2_dir),
           str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    distributed = json.loads(out.read_text())

    documents = [Document(t[:1200]) for t in stdlib_documents()[:5]]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    evaluator = ForgettingEvaluator(documents, AutoTokenizer.from_pretrained(smollm2_dir), window=128,
                                    max_tokens=4000, batch_tokens=512)
    baseline = evaluator.measure(model, 0, baseline=True)
    with torch.no_grad():
        for param in model.model.layers[0].mlp.parameters():
            param.mul_(1.05)
    after = evaluator.measure(model, 1)
    assert distributed["tokens"] == after.tokens and distributed["documents"] == after.documents
    for key in ("bits_per_byte", "word_perplexity", "byte_perplexity", "token_perplexity"):
        assert distributed["baseline"][key] == pytest.approx(baseline.values[key], rel=1e-6)
        assert distributed["after"][key] == pytest.approx(after.values[key], rel=1e-6)
    assert distributed["after"]["kl"] == pytest.approx(after.values["kl"], rel=1e-4)
    assert distributed["after"]["top1_agreement"] == pytest.approx(after.values["top1_agreement"], abs=1e-9)
