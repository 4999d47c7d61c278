"""Run under torchrun: measure held-out metrics with documents sharded over ranks; rank 0 writes the result."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
    from hf_ftkit.forgetting.heldout import Document, stdlib_documents

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    documents = [Document(t[:1200]) for t in stdlib_documents()[:5]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    evaluator = ForgettingEvaluator(documents, tokenizer, window=128, max_tokens=4000, batch_tokens=512)
    baseline = evaluator.measure(model, 0, baseline=True)
    with torch.no_grad():
        for param in model.model.layers[0].mlp.parameters():
            param.mul_(1.05)
    after = evaluator.measure(model, 1)
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump({"baseline": baseline.values, "after": after.values, "tokens": after.tokens,
                       "documents": after.documents}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
