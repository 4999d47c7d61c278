"""FSDP plans against traced sharded steps: two CPU processes (gloo) under torchrun, real small weights.

Each configuration launches ``torchrun --nproc_per_node 2`` on this file. Every rank builds the same
small Llama-shaped model with real (random) weights, shards each decoder layer and the root with
FSDP2's ``fully_shard`` under accelerate's bf16 policy (bf16 compute and reduce, fp32 sharded
parameters: the ``bf16-mixed`` plan), runs two AdamW steps, and records its peak with PyTorch's
``FSDPMemTracker``, which sees the all-gather and reduce-scatter buffers as well as the states and
activations. The plan is ``shard=fsdp, gpus=2`` for the same config; the traced figure is the
allocated peak of rank 0 (both ranks are measured and agree).

What a CPU trace cannot see: NCCL's own communicator buffers (outside PyTorch's allocator; the plan's
fixed ``comm_buffers`` line, not part of the allocated peak compared here) and
stream-ordering effects of overlapping communication with compute on a GPU. DeepSpeed ZeRO-3 is
traced by ``benchmarks/zero3_trace.py`` on the same shapes.

    python benchmarks/sharded_trace.py          # 6 configurations, ~3 min on 2 cores
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from freshness import stamp  # noqa: E402  (a sibling script, not a package)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODELS = {
    "llama-4L-32k": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                     "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
                     "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama-4L-128k": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                      "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 128256,
                      "max_position_embeddings": 4096, "tie_word_embeddings": False},
}
SHAPES = [dict(batch_size=1, seq_len=512, gradient_checkpointing=False),
          dict(batch_size=4, seq_len=512, gradient_checkpointing=False),
          dict(batch_size=4, seq_len=512, gradient_checkpointing=True)]


def batch(job: dict, vocab_size: int) -> tuple[Any, Any]:
    """A traced job's batch: random ids, and the padding mask where the plan holds the batch as padded (the
    planner's own rule, ``padded_batch``). The FSDP and ZeRO-3 traces share it."""
    import torch

    from hf_ftkit.planner.activations import padded_batch
    from hf_ftkit.planner.inputs import PlanInputs
    from hf_ftkit.planner.trace import padding_mask

    ids = torch.randint(0, vocab_size, (job["batch_size"], job["seq_len"]))
    inputs = PlanInputs(method="full", batch_size=job["batch_size"], seq_len=job["seq_len"])
    return ids, padding_mask(ids, padded_batch(inputs))


def _rank_main(job: dict) -> None:
    """One rank of a traced FSDP2 step (run by torchrun)."""
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = AutoConfig.for_model(**job["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if job["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)  # accelerate's bf16
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs(())
    ids, mask = batch(job, config.vocab_size)
    with tracker:
        for step in range(2):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    result = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in peak.items()}
    Path(job["out"]).with_suffix(f".rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def trace(config: dict, batch_size: int, seq_len: int, gradient_checkpointing: bool) -> dict[str, int]:
    """Rank 0's peak bytes by FSDPMemTracker category (``Total`` included), from a 2-process run."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"config": config, "batch_size": batch_size, "seq_len": seq_len,
               "gradient_checkpointing": gradient_checkpointing, "out": str(Path(tmp) / "peak")}
        env = {**os.environ, "HF_FTKIT_SHARDED_JOB": json.dumps(job), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__],
                       check=True, env=env, capture_output=True)
        ranks = [json.loads((Path(tmp) / f"peak.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["Total"] == ranks[1]["Total"], "the two ranks should hold the same bytes"
    return ranks[0]


def compare(trace_step: Callable[..., dict[str, int]], shard: str) -> list[dict]:
    """Every model and shape traced by ``trace_step`` beside the full-FT plan sharded by ``shard`` on 2 GPUs."""
    from hf_ftkit.planner.estimate import estimate
    from hf_ftkit.planner.inputs import PlanInputs
    from hf_ftkit.planner.structure import spec_from_config

    rows = []
    for name, config in MODELS.items():
        spec = spec_from_config(config, name)
        for shape in SHAPES:
            traced = trace_step(config, **shape)
            plan = estimate(spec, PlanInputs(method="full", precision="bf16-mixed", optim="adamw_torch",
                                             shard=shard, gpus=2, **shape))
            error = 100.0 * (plan.allocated_peak_bytes - traced["Total"]) / traced["Total"]
            rows.append({"model": name, **shape, "traced": traced["Total"], "planned": plan.allocated_peak_bytes,
                         "error_pct": error, "traced_by_category": traced})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    rows = compare(trace, "fsdp")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Sharded (FSDP) plans against traced steps", "",
             f"Generated by `python benchmarks/sharded_trace.py` at commit `{commit}` on "
             f"{datetime.date.today().isoformat()}: `torchrun --nproc_per_node 2` on CPU (gloo), real random weights, "
             "FSDP2 `fully_shard` per decoder layer and root, bf16 compute and reduce over fp32 sharded parameters, "
             "torch AdamW (foreach), two steps, a batch of 4 padded by one position (the plan holds such a batch "
             "as padded); traced with `FSDPMemTracker` (allocated bytes, rank 0). Plan: "
             "`--method full --precision bf16-mixed --optim adamw_torch --shard fsdp --gpus 2`.", "",
             "| model | batch x seq | GC | traced MiB | planned MiB | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} x {r['seq_len']} | "
                     f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['traced'] / 2**20:.0f} | "
                     f"{r['planned'] / 2**20:.0f} | {r['error_pct']:+.1f}% |")
    lines += ["", "Not seen by a CPU trace: NCCL communicator buffers (outside PyTorch's allocator, so neither in the "
              "traced nor in the planned allocated peak; the plan adds them to what must fit as a fixed line, 544 MiB "
              "per rank for 2 GPUs and 688 MiB for more, after NVIDIA/nccl#964) and the timing of overlapped "
              "communication on a GPU. DeepSpeed ZeRO-3 on the same shapes: [zero3.md](zero3.md).", ""]
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "sharded.md").write_text("\n".join([*lines, stamp("sharded.md")]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "HF_FTKIT_SHARDED_JOB" in os.environ:
        _rank_main(json.loads(os.environ["HF_FTKIT_SHARDED_JOB"]))
    else:
        main()
