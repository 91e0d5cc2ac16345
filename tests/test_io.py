from __future__ import annotations

import json
import os
import threading

import pytest

from o1pruner.io import DataError, append_jsonl, atomic_path, atomic_write_json, read_jsonl


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temp files left behind


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_append_cuts_fragment_of_killed_writer(tmp_path):
    log = tmp_path / "s.jsonl"
    append_jsonl(log, [{"i": 0}, {"i": 1}])
    with open(log, "ab") as f:  # a writer killed mid-line
        f.write(b'{"i": 2, "te')
    assert [r["i"] for r in read_jsonl(log, tolerate_partial_tail=True)] == [0, 1]
    append_jsonl(log, [{"i": 2}])
    assert [r["i"] for r in read_jsonl(log)] == [0, 1, 2]


def test_append_when_whole_file_is_a_fragment(tmp_path):
    log = tmp_path / "s.jsonl"
    log.write_bytes(b'{"i": 0')
    append_jsonl(log, [{"i": 5}])
    assert read_jsonl(log) == [{"i": 5}]


def test_append_from_threads_keeps_every_line(tmp_path):
    log = tmp_path / "s.jsonl"

    def work(t):
        for i in range(20):
            append_jsonl(log, [{"t": t, "i": i}])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(read_jsonl(log)) == 80


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_jsonl(p)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_append_nothing_is_a_no_op(tmp_path):
    log = tmp_path / "s.jsonl"
    assert append_jsonl(log, []) == 0
    assert not os.path.exists(log)
