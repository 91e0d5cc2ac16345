"""Pre-sampling through a real vLLM engine, in its own process (vLLM spawns workers: the __main__ guard).

``python vllm_worker.py MODEL OUT_DIR``: starts one engine, samples every pair into ``full.jsonl``, then
resumes a copy that lost its last batch and got a cut line, on the same engine, into ``resumed.jsonl``;
releases the engine and prints one JSON line with the resident memory (this process plus its children,
bytes) before the engine, while it runs, and after its release, and the child processes left.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


def tree_rss() -> tuple[int, list[str]]:
    """(RSS of this process and all its descendants, the command lines of the live descendants)."""
    import psutil

    me = psutil.Process()
    total, alive = me.memory_info().rss, []
    for c in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # exited since it was listed
            total += c.memory_info().rss
            if c.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(c.cmdline()))
    return total, alive


def main(model: str, out_dir: str) -> None:
    from transformers import AutoTokenizer

    from o1pruner.data import Problem
    from o1pruner.io import read_jsonl
    from o1pruner.sampling import SamplingConfig, make_vllm_engine, release_vllm_engine, sample_problems

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(model)
    problems = [
        Problem(id=f"p{i}", question=f"What is {i}+{2 * i + 1}?", answer=str(3 * i + 1)) for i in range(5)
    ]
    cfg = SamplingConfig(k=3, backend="vllm", max_new_tokens=12, batch_size=2, seed=7)
    before, _ = tree_rss()
    engine = make_vllm_engine(model, cfg)
    during, _ = tree_rss()
    sample_problems(problems, engine, tok, out / "full.jsonl", cfg)
    lines = (out / "full.jsonl").read_text().splitlines(keepends=True)
    # the last batch (2 problems x k) is lost and a kill cut the line before it in half
    kept = lines[: -2 * cfg.k]
    (out / "resumed.jsonl").write_text("".join(kept[:-1]) + kept[-1][: len(kept[-1]) // 2])
    sample_problems(problems, engine, tok, out / "resumed.jsonl", cfg)
    release_vllm_engine(engine)
    del engine
    after, children = tree_rss()
    key = lambda r: (r["problem_id"], r["sample_index"])
    same = sorted(read_jsonl(out / "full.jsonl"), key=key) == sorted(
        read_jsonl(out / "resumed.jsonl"), key=key
    )
    print(
        json.dumps({"before": before, "during": during, "after": after, "children": children, "same": same})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
