"""Training data: every bad record is reported with its file and line; duplicates and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.llm.loader import LoadedModel
from app.llm.prompts import DEFAULT_SYSTEM_PROMPT, ChatTurn, render
from training.data import DataError, prepare_data

GOOD = {"instruction": "How many days of leave?", "input": "", "output": "Twenty days, plus public holidays."}


def prepare(tiny_model: LoadedModel, *files: Path, **options: object):  # type: ignore[no-untyped-def]
    settings = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "prompt_template": "alpaca", "max_length": 128,
                "eval_fraction": 0.0, "seed": 1, **options}  # fmt: skip
    return prepare_data([str(f) for f in files], tokenizer=tiny_model.tokenizer, **settings)  # type: ignore[arg-type]


def test_every_bad_record_kind_is_reported_with_its_line(tiny_model: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    lines = [
        json.dumps(GOOD).encode(),  # 1 good
        b'{"instruction": "broken", ',  # 2 invalid JSON
        json.dumps({"instruction": "q"}).encode(),  # 3 missing output
        json.dumps({"instruction": "q", "output": "  "}).encode(),  # 4 empty output
        json.dumps({"instruction": "q", "output": 42}).encode(),  # 5 wrong type
        b'{"instruction": "caf\xe9", "output": "x"}',  # 6 invalid UTF-8
        json.dumps({"instruction": "long " * 200, "output": "x"}).encode(),  # 7 over-long
        b"",  # 8 blank: ignored
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),  # 9 chat without answer
        json.dumps(["not", "an", "object"]).encode(),  # 10 not an object
    ]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as refused:
        prepare(tiny_model, path)
    message = str(refused.value)
    assert message.startswith("8 bad records (fix them, or pass --skip-bad-records")
    for line, problem in [
        (2, "invalid JSON"),
        (3, "missing field 'output'"),
        (4, "empty output"),
        (5, "field 'output' must be text"),
        (6, "invalid UTF-8 at byte 20"),
        (7, "over-long: 2"),
        (9, "the last message must be a non-empty assistant"),
        (10, "a record must be an object, not list"),
    ]:
        assert f"{path}:{line}: {problem}" in message, (line, message)
    kept = prepare(tiny_model, path, skip_bad_records=True)
    assert (len(kept.train), len(kept.report.bad)) == (1, 8)


def test_json_arrays_csv_and_chat_records(tiny_model: LoadedModel, tmp_path: Path) -> None:
    array = tmp_path / "finance.json"
    array.write_text(
        '[\n  {"instruction": "a", "output": "b", "text": "extra columns are ignored"},\n'
        '  {"instruction": "c", "input": "ctx", "output": "d"},\n  {"instruction": "e"}\n]'
    )
    with pytest.raises(DataError, match=rf"{array}:4: missing field 'output'"):
        prepare(tiny_model, array)
    table = tmp_path / "faq.csv"
    table.write_text('instruction,input,output\nWho approves travel?,,"Your manager, before booking."\n')
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        )
    )
    data = prepare(tiny_model, table, chat)
    assert [e.completion for e in data.train] == ["Your manager, before booking.", "Hello!"]
    assert data.train[0].source == f"{table}:2"
    # The prompt is exactly what the server sends for the same question.
    served = render(tiny_model.tokenizer, [ChatTurn("system", DEFAULT_SYSTEM_PROMPT), ChatTurn("user", "Hi")])
    assert data.train[1].prompt == served


def test_duplicates_are_dropped_and_the_split_is_fixed_by_the_seed(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "dup.jsonl"
    records = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in [*records, records[3], records[7]]))
    first = prepare(tiny_model, path, eval_fraction=0.25, seed=5)
    again = prepare(tiny_model, path, eval_fraction=0.25, seed=5)
    other = prepare(tiny_model, path, eval_fraction=0.25, seed=6)
    assert first.report.duplicates == 2 and (first.report.train, first.report.eval) == (30, 10)
    assert [e.source for e in first.eval] == [e.source for e in again.eval]
    assert [e.source for e in first.eval] != [e.source for e in other.eval]
    assert first.report.files[0].records == 42 and len(first.report.files[0].sha256) == 64
