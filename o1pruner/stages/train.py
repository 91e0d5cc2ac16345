"""Stage 3, training: off-policy PPO-clip on ``scored.parquet``; writes ``checkpoints/``, ``model/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from o1pruner import distributed
from o1pruner.modeling import free_memory

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def run(p: Pipeline) -> None:
    """Train the reference model on ``scored.parquet`` and save it to ``model/`` (skipped when done).

    Under a launcher every process trains (DDP or FSDP2) and rank 0 saves; after FSDP2 the sharded model
    is dropped, and the next stage loads the tuned model from ``model/``.
    """
    model_dir = p.path("model")
    if p.is_complete("train", "model/DONE", needs=("scored.parquet", "score")):
        return
    from o1pruner.modeling import save_model
    from o1pruner.train import Trainer, release_paged_optimizer_states

    model = p.models.reference()
    if p.path("checkpoints").exists():
        p.log("train: resuming from checkpoints/")
    trainer = Trainer(model, p.path("scored.parquet"), p.cfg.train_config(), p.run_dir)
    trainer.train(resume=True)
    state = None
    sharded = trainer.parallel == "fsdp"
    if sharded:
        from o1pruner.parallel import full_state_dict

        state = full_state_dict(trainer.policy)  # collective; the whole model on rank 0's CPU
    del trainer  # optimizer state and gradients go before evaluation
    moved = release_paged_optimizer_states()
    if moved:
        p.log(f"train: {moved / 2**30:.2f} GiB of paged optimizer states moved off the GPU")
    free_memory()
    model.eval()
    with distributed.main_first() as main:
        if main:  # atomic, writes model/DONE
            save_model(model, p.models.tokenizer(), model_dir, merge=p.cfg.merge, state_dict=state)
    if sharded:
        p.models.release()
    else:
        p.models.state = "tuned"
    p.log(f"train: tuned model saved to {model_dir}{' (merged)' if p.cfg.merge else ''}")
