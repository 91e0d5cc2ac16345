"""``o1pruner.child.run_in_child``: work in a spawned process, its failures reported with the child's text,
and the vLLM generation stages routed through it only where they should be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from o1pruner import child
from o1pruner.stages import sample


def _write(path: str, text: str, *, suffix: str = "") -> None:
    Path(path).write_text(f"{text}{suffix} from {os.getpid()}", encoding="utf-8")


def _raise(value: str) -> None:
    raise ValueError(f"bad value {value!r}")


def _die(code: int) -> None:
    os._exit(code)


def test_the_function_runs_in_another_process(tmp_path):
    out = tmp_path / "out.txt"
    child.run_in_child("demo", _write, str(out), "hello", suffix="!")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("hello! from ") and int(text.rsplit(" ", 1)[1]) != os.getpid()


def test_an_exception_in_the_child_names_the_stage_and_the_error():
    with pytest.raises(
        child.ChildFailed, match=r"eval base failed in its child process: ValueError: bad value 'x'"
    ):
        child.run_in_child("eval base", _raise, "x")


def test_a_child_that_dies_silently_is_reported_with_its_exit_code():
    with pytest.raises(child.ChildFailed, match=r"sample: its child process ended with exit code 3"):
        child.run_in_child("sample", _die, 3)


class _Cfg:
    def __init__(self, backend):
        self.backend = backend


@pytest.mark.parametrize(
    "backend,distributed,in_child", [("vllm", False, True), ("hf", False, False), ("vllm", True, False)]
)
def test_generation_uses_a_child_only_for_vllm_in_one_process(monkeypatch, backend, distributed, in_child):
    calls = []
    monkeypatch.setattr(child, "run_in_child", lambda *a, **k: calls.append(("child", a[0])))
    monkeypatch.setattr(sample.distributed, "world", lambda: type("W", (), {"distributed": distributed})())
    p = type("P", (), {"log": staticmethod(lambda msg: calls.append(("log", msg)))})()
    sample.run_generation(p, "sample", _Cfg(backend), lambda *a, **k: calls.append(("here", a, k)), 1, desc=2)
    logged = ("log", "sample: the vLLM engine runs in a child process")
    assert calls == ([logged, ("child", "sample")] if in_child else [("here", (1,), {"desc": 2})])


def test_the_function_may_take_a_desc_keyword(tmp_path):
    """evaluate_model takes ``desc=``: it must reach the function, not the runner."""
    out = tmp_path / "out.txt"
    child.run_in_child("eval base", _write_desc, str(out), desc="eval base")
    assert out.read_text(encoding="utf-8") == "eval base"


def _write_desc(path: str, *, desc: str) -> None:
    Path(path).write_text(desc, encoding="utf-8")
