from __future__ import annotations

import csv
import hashlib
import json

import pytest

from o1pruner.data import HUB_SOURCES, Problem, load_problems, problem_id, read_problems, save_problems
from o1pruner.io import DataError

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4.  How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1000 eggs.\nHow many?", "answer": "It sells 1,000 eggs.\n####  1,000 "},
    {"question": "What is 10 - 12?", "answer": "#### -2"},
]
MATH_ROWS = [
    {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
        "solution": "We get $\\boxed{\\frac{1}{2}}$ first, then $\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
        "level": "Level 3",
        "type": "Algebra",
    },
    {
        "problem": "Find the set.",
        "solution": "It is $\\boxed{\\{1, 2\\}}$.",
        "level": "Level 5",
        "type": "Counting & Probability",
    },
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_json(path, rows, wrap=False):
    path.write_text(json.dumps({"data": rows} if wrap else rows), encoding="utf-8")
    return path


WRITERS = {
    "jsonl": _write_jsonl,
    "json": _write_json,
    "json-wrapped": lambda p, r: _write_json(p, r, wrap=True),
    "parquet": _write_parquet,
    "csv": _write_csv,
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_gsm8k_style_in_every_format(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"gsm.{fmt.split('-')[0]}", GSM_ROWS)
    problems = load_problems(str(path))
    assert [p.answer for p in problems] == ["7", "1,000", "-2"]
    assert [p.question for p in problems] == [r["question"] for r in GSM_ROWS]
    assert problems[0].id == problem_id(GSM_ROWS[0]["question"])
    assert all(p.level is None for p in problems)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_math_style_gold_is_last_box_of_solution(tmp_path, fmt):
    problems = load_problems(WRITERS[fmt](tmp_path / f"math.{fmt}", MATH_ROWS))
    assert [p.answer for p in problems] == ["\\frac{3}{4}", "\\{1, 2\\}"]
    assert [p.level for p in problems] == ["3", "5"]
    assert problems[0].meta["type"] == "Algebra"


def test_answer_field_wins_over_solution_and_subject_is_level_fallback(tmp_path):
    rows = [{"problem": "P?", "solution": "\\boxed{1}", "answer": "2", "subject": "Geometry"}]
    (p,) = load_problems(_write_jsonl(tmp_path / "x.jsonl", rows))
    assert p.answer == "2" and p.level == "Geometry" and p.meta["subject"] == "Geometry"


def test_explicit_field_mapping(tmp_path):
    rows = [{"q": "Question one?", "gold_text": "So \\boxed{5}.", "question": "not this"}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    (p,) = load_problems(path, question_field="q", answer_field="gold_text")
    assert p.question == "Question one?" and p.answer == "5"
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: missing question field 'nope'"):
        load_problems(path, question_field="nope")
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: missing answer field \(tried nope"):
        load_problems(path, answer_field="nope")


def test_auto_detected_prompt_and_input_fields(tmp_path):
    rows = [{"prompt": "A?", "target": 3}, {"input": "B?", "final_answer": "x^2"}]
    problems = load_problems(_write_jsonl(tmp_path / "a.jsonl", rows))
    assert [(p.question, p.answer) for p in problems] == [("A?", "3"), ("B?", "x^2")]


def test_stable_ids_normalise_whitespace():
    q = "What is\n 2 +  2?"
    want = hashlib.sha1(b"What is 2 + 2?").hexdigest()[:16]
    assert problem_id(q) == want == problem_id("  What is 2 + 2? ")
    assert len(want) == 16 and int(want, 16) >= 0
    assert problem_id("What is 2 + 3?") != want


def test_duplicates_keep_the_first(tmp_path):
    rows = [
        {"question": "Same  q", "answer": "1"},
        {"question": "Other", "answer": "2"},
        {"question": "Same q", "answer": "3"},
    ]
    problems = load_problems(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(p.question, p.answer) for p in problems] == [("Same  q", "1"), ("Other", "2")]


def test_seeded_shuffle_and_limit(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": str(i)} for i in range(50)]
    path = _write_jsonl(tmp_path / "many.jsonl", rows)
    a = load_problems(path, shuffle=True, seed=3, limit=10)
    b = load_problems(path, shuffle=True, seed=3, limit=10)
    c = load_problems(path, shuffle=True, seed=4, limit=10)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.id for p in a] != [p.id for p in c]
    assert len(a) == 10 and len({p.id for p in a}) == 10
    # limit without shuffle keeps file order; a larger limit than the data is fine
    assert [p.answer for p in load_problems(path, limit=3)] == ["0", "1", "2"]
    assert len(load_problems(path, limit=1000)) == 50
    assert load_problems(path, limit=0) == []
    # the shuffled order is a permutation, and a smaller limit is a prefix of a larger one
    full = load_problems(path, shuffle=True, seed=3)
    assert sorted(p.id for p in full) == sorted(p.id for p in load_problems(path))
    assert [p.id for p in full[:10]] == [p.id for p in a]
    with pytest.raises(ValueError, match="limit"):
        load_problems(path, limit=-1)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_problems(str(missing))
    with pytest.raises(DataError, match="file not found"):
        read_problems(missing)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_problems(path)


def test_malformed_json_and_non_object_rows(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "a", "answer": "1"},\n {"question": ]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, line 2: not valid JSON"):
        load_problems(bad)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_problems(scalar)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a", "answer": "1"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: expected an object"):
        load_problems(rows)
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"g\.parquet: cannot read as parquet"):
        load_problems(garbage)


def test_row_without_answer_names_file_line_and_key(tmp_path):
    path = _write_jsonl(tmp_path / "noans.jsonl", [GSM_ROWS[0], {"question": "Where is it?", "hint": "x"}])
    with pytest.raises(DataError, match=r"noans\.jsonl, line 2: missing answer field \(tried answer"):
        load_problems(path)
    csv_path = _write_csv(tmp_path / "noq.csv", [{"answer": "1", "text": "hi"}])
    with pytest.raises(DataError, match=r"noq\.csv, line 2: no question field"):
        load_problems(csv_path)
    parquet = _write_parquet(tmp_path / "sol.parquet", [{"problem": "P", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"sol\.parquet, row 1: field 'solution' has no \\boxed\{\} answer"):
        load_problems(parquet)


def test_empty_answer_value_is_skipped_with_warning(tmp_path, caplog):
    rows = [{"question": "A?", "answer": "1"}, {"question": "B?", "answer": "  "}]
    with caplog.at_level("WARNING", logger="o1pruner.data"):
        problems = load_problems(_write_jsonl(tmp_path / "e.jsonl", rows))
    assert [p.question for p in problems] == ["A?"]
    assert "e.jsonl, line 2" in caplog.text
    with pytest.raises(DataError, match="no problems"):
        load_problems(_write_jsonl(tmp_path / "none.jsonl", rows[1:]))


def test_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'gsm9k'"):
        load_problems("gsm9k")
    txt = tmp_path / "p.txt"
    txt.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_problems(str(txt))


def _fake_hub(monkeypatch, rows_by_repo):
    import datasets

    calls = []

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        if args[0] not in rows_by_repo:
            raise FileNotFoundError(f"Couldn't reach {args[0]} (offline)")
        return datasets.Dataset.from_list(rows_by_repo[args[0]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_short_names_through_load_dataset(monkeypatch):
    calls = _fake_hub(
        monkeypatch,
        {
            "openai/gsm8k": GSM_ROWS,
            "DigitalLearningGmbH/MATH-lighteval": MATH_ROWS,
            "HuggingFaceH4/MATH-500": [
                {
                    "problem": "P5",
                    "solution": "\\boxed{9}",
                    "answer": "9",
                    "level": 2,
                    "subject": "Algebra",
                    "unique_id": "test/x.json",
                }
            ],
            "HuggingFaceH4/aime_2024": [{"id": 60, "problem": "Aya?", "solution": "...", "answer": "204"}],
            "MARIO-Math-Reasoning/Gaokao2023-Math-En": [{"question": "G?", "answer": "$\\sqrt{5}$"}],
        },
    )
    assert [p.answer for p in load_problems("gsm8k")] == ["7", "1,000", "-2"]
    assert calls[-1] == (("openai/gsm8k", "main"), "test")
    load_problems("gsm8k", split="train")
    assert calls[-1] == (("openai/gsm8k", "main"), "train")
    assert [p.answer for p in load_problems("math", limit=1)] == ["\\frac{3}{4}"]
    assert calls[-1] == (("DigitalLearningGmbH/MATH-lighteval", "default"), "train")
    (p,) = load_problems("math500")
    assert (p.answer, p.level, p.meta["unique_id"]) == ("9", "2", "test/x.json")
    assert calls[-1] == (("HuggingFaceH4/MATH-500",), "test")
    (p,) = load_problems("aime24")
    assert (p.answer, p.meta["id"]) == ("204", 60)
    (p,) = load_problems("gaokao")
    assert p.answer == "$\\sqrt{5}$"
    assert set(HUB_SOURCES) == {"gsm8k", "math", "math500", "aime24", "gaokao"}


def test_hub_errors(monkeypatch):
    _fake_hub(monkeypatch, {"openai/gsm8k": GSM_ROWS})
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_problems("gsm8k", split="validation")
    with pytest.raises(DataError, match=r"could not load Hub data set 'someone/else'.*offline"):
        load_problems("someone/else")


def test_save_and_read_roundtrip(tmp_path):
    problems = [
        Problem(id="abc", question="Q1 ünïcode?", answer="\\frac{1}{2}", level="3", meta={"source": "x"}),
        Problem(id="def", question="Q2", answer="7"),
    ]
    path = tmp_path / "run" / "problems" / "train.jsonl"
    save_problems(path, problems)
    assert read_problems(path) == problems
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary file left behind
    save_problems(path, problems[:1])
    assert read_problems(path) == problems[:1]


def test_read_problems_rejects_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q"}\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: missing or non-text field 'answer'"):
        read_problems(path)
    path.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: not valid JSON"):
        read_problems(path)


EXPECTED_REAL = {
    "gsm8k_train.jsonl": 7473,
    "gsm8k_test.jsonl": 1319,
    "math500_test.jsonl": 500,
    "gaokao2023en_test.jsonl": 383,  # 385 rows, two of them with an empty answer
    "aime24_test.jsonl": 30,
}


@pytest.mark.parametrize("name", list(EXPECTED_REAL))
def test_real_files_load(shared_data, name):
    problems = load_problems(shared_data / name)
    assert len(problems) == EXPECTED_REAL[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    if name.startswith("gsm8k"):
        assert all("####" not in p.answer and "<<" not in p.answer for p in problems)
    if name == "math500_test.jsonl":
        assert {p.level for p in problems} == {"1", "2", "3", "4", "5"}
        assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    if name == "aime24_test.jsonl":
        assert problems[0].answer == "204"
    again = load_problems(shared_data / name, shuffle=True, seed=1, limit=5)
    assert [p.id for p in again] == [
        p.id for p in load_problems(shared_data / name, shuffle=True, seed=1, limit=5)
    ]


def test_real_gsm8k_gold_matches_after_hashes(shared_data):
    first = json.loads((shared_data / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    (p,) = load_problems(shared_data / "gsm8k_test.jsonl", limit=1)
    assert p.answer == first["answer"].split("####")[-1].strip() == "18"


def test_short_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, {"DigitalLearningGmbH/MATH-lighteval": MATH_ROWS})
    (tmp_path / "math").mkdir()
    monkeypatch.chdir(tmp_path)
    assert len(load_problems("math")) == 2 and calls
    # a file without a known suffix is read by its suffix rule: rejected with its name
    (tmp_path / "gsm8k").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems("gsm8k")
