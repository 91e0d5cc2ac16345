"""A run directory survives kill -9 at any moment, and resuming never runs code planted in it.

Killed several times at random moments and rerun with the same command, a lora run ends with the same
bytes as an uninterrupted one (samples, scored set, adapter, evaluations). A checkpoint file replaced by a
pickle that would run code is refused on resume with exit 2, and its code does not run.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import time

import pytest
from cli_runs import differing, make_inputs, result_bytes, run_cli, small_run_args, start_cli

KILLS = 4
LORA = ("--mode", "lora", "--save-every", "1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    inputs = make_inputs(tmp_path_factory.mktemp("crash"))
    out = inputs["root"] / "reference"
    start = time.monotonic()
    proc = run_cli(*small_run_args(inputs, out, *LORA))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**inputs, "dir": out, "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_bytes(reference):
    out = reference["root"] / "killed"
    args = small_run_args(reference, out, *LORA)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    log = reference["root"] / "killed.log"
    kills = []
    latest = reference["seconds"]  # kill moments are drawn in [1 s, latest]
    while len(kills) < KILLS:
        delay = rng.uniform(1.0, latest)
        proc = start_cli(*args, log=log)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:  # still running at the chosen moment: kill it there
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(round(delay, 2))
        else:
            assert proc.returncode == 0, log.read_text()[-4000:]
            if kills:
                break
            # Finished before any kill (this run was faster than the reference): start over, earlier.
            shutil.rmtree(out)
            latest = max(1.5, latest / 2)
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr[-4000:]
    assert kills, f"no attempt was killed (seed {seed})"
    assert differing(result_bytes(reference["dir"]), result_bytes(out)) == [], (
        f"kill seed {seed}, kills at {kills} s"
    )


class _Planted:
    """Unpickling this runs ``os.mkdir(path)``: what a pickle planted in a shared run directory can do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt"])
def test_planted_pickle_in_a_checkpoint_is_refused_with_exit_2(reference, name):
    out = reference["root"] / f"planted-{name}"
    shutil.copytree(reference["dir"], out)
    shutil.rmtree(out / "model")  # training is not finished: the rerun resumes from the last checkpoint
    last = (out / "checkpoints" / "last").read_text().strip()
    marker = reference["root"] / f"code-ran-{name}"
    (out / "checkpoints" / last / name).write_bytes(pickle.dumps(_Planted(str(marker))))
    proc = run_cli(*small_run_args(reference, out, *LORA))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert not marker.exists()
    assert "Traceback" not in proc.stderr
    assert f"{name}: refused to load" in proc.stderr
