"""Helper process for the kill-and-resume test of ``o1pruner.sampling.sample_problems`` (not a test module).

Usage: python tests/sampling_worker.py MODEL_DIR PROBLEMS_JSON OUT_JSONL

Runs ``sample_problems`` with the config the test uses (``worker_config()``). With O1P_TEST_SLEEP=SECONDS
every forward pass of the model sleeps that long, so the parent can kill the process mid-run; the hook lives
here, not in library code.
"""

from __future__ import annotations

import json
import os
import sys
import time


def worker_config():
    from o1pruner.sampling import SamplingConfig

    return SamplingConfig(k=4, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=3, batch_size=3)


def load_problems(path):
    from o1pruner.data import Problem

    with open(path, encoding="utf-8") as f:
        return [Problem(**p) for p in json.load(f)]


def main(model_dir: str, problems_json: str, out_path: str) -> None:
    from o1pruner.modeling import load_model
    from o1pruner.sampling import sample_problems

    model, tokenizer = load_model(model_dir, mode="none", device="cpu", torch_dtype="float32")
    delay = float(os.environ.get("O1P_TEST_SLEEP", "0"))
    if delay > 0:
        model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    sample_problems(load_problems(problems_json), model, tokenizer, out_path, worker_config())


if __name__ == "__main__":
    main(*sys.argv[1:4])
