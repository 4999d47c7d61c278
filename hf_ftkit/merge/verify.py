"""Checking a merge: the merged model's logits against the base + adapter model's, on a few prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hf_ftkit.merge._stream_io import read_tensor
from hf_ftkit.merge.adapters import LoraModule

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Explain in one sentence why the sky is blue.",
)
# Largest max |Δlogit| accepted by default. Both sides are evaluated in float32, so the difference is the merge's
# own rounding of W + ΔW to the output dtype: ~1e-4 in float32, ~0.1-0.2 in bf16 and ~0.02 in fp16 on SmolLM2 with
# a large random update; a wrong base or a lost update moves logits by whole units.
DEFAULT_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 1.0, torch.float16: 0.25}


@dataclass
class Verification:
    """How the merged model compares with base + adapter (``mode`` says which check ran)."""

    mode: str  # "logits": whole models on prompts; "layers": each merged layer on random inputs
    max_abs_logit_diff: float
    top1_agreement: float
    tolerance: float
    prompts: int

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def prompt_ids(tokenizer_dir: Path | None, prompts: list[str] | None, vocab_size: int) -> list[torch.Tensor]:
    """Token ids for the prompts: the model's tokenizer when it has one, else fixed pseudo-random ids."""
    texts = list(prompts or DEFAULT_PROMPTS)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
        return [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 16), generator=generator) for _ in texts]


@torch.inference_mode()
def logits_of(model: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids).logits[0].float() for ids in inputs]


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor], tolerance: float) -> Verification:
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, merged, strict=True)]
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(reference, merged, strict=True)]
    worst = float(torch.tensor(diffs).max())  # NaN propagates (Python's max() would drop it by position)
    return Verification("logits", worst, sum(agree) / len(agree), tolerance, len(reference))


def verify_layers(
    modules: dict[str, LoraModule], written: dict[str, Any], base: dict[str, Any], tolerance: float
) -> Verification:
    """Bounded-memory check for merges too large to load: per merged layer, ``x W_mergedᵀ`` against
    ``x Wᵀ + scaling·(x Aᵀ)Bᵀ`` on a few random rows, read back from the written files one tensor at a time.
    The reported difference is the largest over layers, relative to the reference output's largest entry.
    """
    generator = torch.Generator().manual_seed(0)
    worst, agree = 0.0, []
    for name, module in modules.items():
        if worst != worst:
            break
        if module.magnitude is not None or module.kind != "linear" or module.fan_in_fan_out:
            continue  # DoRA/embedding layers are checked by value in the tests; this check covers plain LoRA
        merged = read_tensor(written[name]).float()
        weight = read_tensor(base[name]).float()
        x = torch.randn(4, weight.shape[1], generator=generator)
        reference = x @ weight.T + (x @ module.lora_A.float().T) @ module.lora_B.float().T * module.scaling
        got = x @ merged.T
        diff = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        worst = diff if diff != diff else max(worst, diff)  # a NaN stays NaN
        agree.append(float((got.argmax(-1) == reference.argmax(-1)).float().mean()))
    return Verification("layers", worst, sum(agree) / len(agree) if agree else 1.0, tolerance, 0)


def model_bytes(entries: dict[str, Any]) -> int:
    return sum(e.nbytes for e in entries.values())


def available_ram() -> int:
    """Bytes of RAM available now (Linux ``MemAvailable``; total RAM elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
