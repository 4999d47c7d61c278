"""DeepSpeed ZeRO-3 plans against traced sharded steps: two CPU processes (gloo) under torchrun.

Each configuration launches ``torchrun --nproc_per_node 2`` on this file. Every rank builds the same
small Llama-shaped model (``benchmarks/sharded_trace.py``'s shapes) with real random weights and hands
it to ``deepspeed.initialize`` with ZeRO stage 3, bf16 and the bucket sizes accelerate derives for
``auto`` (reduce bucket h², prefetch bucket 0.9 h², persistence threshold 10 h), and a torch AdamW as
the client optimizer. DeepSpeed runs on its CPU accelerator, which talks gloo when oneCCL is absent.

What is counted: PyTorch's ``MemTracker`` starts after ``deepspeed.initialize`` and is handed every tensor
alive at that moment (the bf16 parameter partitions, the fp32 master partitions, DeepSpeed's flat gradient
buffers), then sees every tensor the two training steps create and free (gathered parameters, prefetch,
reduce buckets, the optimizer states created at the first step, activations), storage resizes included.
The traced figure is rank 0's allocated peak; the plan is ``--shard zero3 --gpus 2`` for the same step.

What it cannot see: NCCL's buffers on a GPU (the plan's fixed ``comm_buffers`` line), and DeepSpeed's
CUDA-only paths (fused Adam, pinned host buffers of the offload paths, which are not traced).

    pip install deepspeed
    python benchmarks/zero3_trace.py          # 6 configurations, a few minutes on 2 cores
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from freshness import stamp  # noqa: E402  (a sibling script, not a package)
from sharded_trace import batch, compare  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def _ds_config(hidden: int, batch_size: int) -> dict:
    """ZeRO-3 as accelerate fills in ``auto`` from the model's hidden size."""
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": hidden * hidden,
                                  "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                                  "stage3_param_persistence_threshold": 10 * hidden,
                                  "stage3_max_live_parameters": int(1e9), "stage3_max_reuse_distance": int(1e9)}}


def _rank_main(job: dict) -> None:
    """One rank of a traced ZeRO-3 step (run by torchrun)."""
    import deepspeed
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    config = AutoConfig.for_model(**job["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if job["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=_ds_config(config.hidden_size, job["batch_size"]))
    del model, optimizer
    gc.collect()
    tracker = MemTracker()
    tracker.track_external(*[t for t in gc.get_objects() if isinstance(t, torch.Tensor)])
    ids, mask = batch(job, config.vocab_size)
    with tracker:
        for _ in range(2):
            loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
            engine.backward(loss)
            engine.step()
            tracker.reset_mod_stats()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    result = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in peak.items()}
    Path(job["out"]).with_suffix(f".rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


def trace(config: dict, batch_size: int, seq_len: int, gradient_checkpointing: bool) -> dict[str, int]:
    """Rank 0's peak bytes (``Total`` and by MemTracker category) from a 2-process ZeRO-3 run."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"config": config, "batch_size": batch_size, "seq_len": seq_len,
               "gradient_checkpointing": gradient_checkpointing, "out": str(Path(tmp) / "peak")}
        env = {**os.environ, "HF_FTKIT_ZERO3_JOB": json.dumps(job), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu"}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__],
                             env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-4000:])
        ranks = [json.loads((Path(tmp) / f"peak.rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0] | {"rank1_total": ranks[1]["Total"]}


def main() -> None:
    rows = compare(trace, "zero3")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import deepspeed

    lines = ["# DeepSpeed ZeRO-3 plans against traced steps", "",
             f"Generated by `python benchmarks/zero3_trace.py` at commit `{commit}` on "
             f"{datetime.date.today().isoformat()} with DeepSpeed {deepspeed.__version__}: "
             "`torchrun --nproc_per_node 2` on CPU (DeepSpeed's CPU accelerator, gloo), real random weights, "
             "ZeRO stage 3 with bf16 and accelerate's `auto` bucket sizes, torch AdamW as the client optimizer, "
             "two steps, a batch of 4 padded by one position; traced with PyTorch's `MemTracker` "
             "(allocated bytes of rank 0, every tensor alive after `deepspeed.initialize` included). Plan: "
             "`--method full --precision bf16-mixed --optim adamw_torch --shard zero3 --gpus 2`.", "",
             "| model | batch x seq | GC | traced MiB (rank 0 / 1) | planned MiB | error |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} x {r['seq_len']} | "
                     f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['traced'] / 2**20:.0f} / "
                     f"{r['traced_by_category']['rank1_total'] / 2**20:.0f} | {r['planned'] / 2**20:.0f} | "
                     f"{r['error_pct']:+.1f}% |")
    lines += ["", "Not seen by a CPU trace: NCCL's buffers (outside PyTorch's allocator: the plan's fixed "
              "`comm_buffers` line, not part of the allocated peak compared here), DeepSpeed's CUDA-only kernels and "
              "pinned host buffers, and the timing of overlapped communication on a GPU.", ""]
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "zero3.md").write_text("\n".join([*lines, stamp("zero3.md")]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "HF_FTKIT_ZERO3_JOB" in os.environ:
        _rank_main(json.loads(os.environ["HF_FTKIT_ZERO3_JOB"]))
    else:
        main()
