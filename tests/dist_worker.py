"""One process of a ``torchrun`` training run in the tests: train a scored set, save the trained weights.

``python -m torch.distributed.run --nproc-per-node N tests/dist_worker.py MODEL SCORED OUT MODE PARALLEL
MAX_STEPS [SAVE_EVERY [LEVEL[:REDUCTION]]]``: loads MODEL in MODE (float32, or MODE-DTYPE, CPU), trains on SCORED into OUT (DDP, or FSDP2 when
PARALLEL is "fsdp"; one process when launched without torchrun) and rank 0 writes the whole model's
trainable tensors to OUT/weights.safetensors.
"""

from __future__ import annotations

import sys

import torch

from o1pruner import distributed
from o1pruner.modeling import load_model
from o1pruner.parallel import full_state_dict
from o1pruner.train import TrainConfig, Trainer


def main(
    model: str,
    scored: str,
    out: str,
    mode: str,
    par: str,
    max_steps: str,
    save_every: str = "0",
    level: str = "sequence_geomean",
) -> None:
    from safetensors.torch import save_file

    distributed.init()
    torch.manual_seed(0)
    mode, _, dtype = mode.partition("-")  # "freeze-bfloat16": loaded in 16 bits
    net = load_model(
        model,
        mode=mode,
        device="cpu",
        torch_dtype=dtype or "float32",
        fp32_masters=par != "fsdp",  # FSDP2 casts the trainable layers as it shards them
        lora_r=4,
        lora_alpha=8,
        freeze_last_n_layers=1 if mode == "freeze" else 0,
    )[0]
    cfg = TrainConfig(
        learning_rate=2e-3,
        effective_batch_size=5,
        micro_batch_tokens=24,
        warmup_ratio=0.0,
        backend="torch",
        adam_eps=1e-6,  # k_proj biases get a zero gradient up to rounding; Adam would scale that noise to lr
        seed=3,
        max_steps=int(max_steps),
        save_every=int(save_every),
        fsdp=par == "fsdp",
        importance_level=level.split(":")[0],
        reduction=[*level.split(":"), "sequence_mean"][1],
    )
    trainer = Trainer(net, scored, cfg, out)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in net.parameters() if p.requires_grad}
    assert dtypes == {"float32"}, f"trainable weights in {dtypes}"
    trainer.train()
    names = {n for n, _ in trainer.named_params}
    if trainer.parallel == "fsdp":
        state = full_state_dict(trainer.policy)
    else:
        state = {n: p.detach() for n, p in net.named_parameters()} if distributed.world().is_main else None
    if state is not None:
        save_file(
            {n: t.contiguous().clone() for n, t in state.items() if n in names}, f"{out}/weights.safetensors"
        )
    distributed.shutdown()


def slow_stage(out: str) -> None:
    """``dist_worker.py stage OUT``: a sharded stage over 5 problems whose rank 1 writes late; rank 0
    must merge only after it."""
    import json
    import time
    from pathlib import Path

    from o1pruner.io import append_jsonl, read_jsonl

    distributed.init()

    def work(shard, out_path, done_paths) -> None:
        if distributed.world().rank == 1:
            time.sleep(2.0)
        append_jsonl(out_path, [{"problem_id": p["id"], "sample_index": 0} for p in shard])

    path = Path(out) / "responses.jsonl"
    problems = [{"id": f"p{i}"} for i in range(5)]
    distributed.sharded_stage(path, problems, lambda f: read_jsonl(f, tolerate_partial_tail=True), work)
    if distributed.world().rank == 1:  # every rank sees the merged file once the stage returns
        print(json.dumps([r["problem_id"] for r in read_jsonl(path)]))
    distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        slow_stage(sys.argv[2])
    else:
        main(*sys.argv[1:])
