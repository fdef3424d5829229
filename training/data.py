"""Read question/answer data into training examples, reporting every bad record with its place.

Formats, told apart by extension and content:
- Alpaca (finance-alpaca's schema): `instruction`, optional `input`, `output`; extra columns are
  ignored. As a JSON array (`.json`), one object per line (`.jsonl`), or `.csv` with those columns.
- Chat (`.jsonl`): `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
  the last message is the assistant's answer, the rest is context.

Each record becomes a prompt (rendered exactly as the server renders a conversation, see
app/llm/prompts.py) and a completion (the answer, which alone carries the loss). Exact
duplicates are dropped and counted; the train/eval split is fixed by the seed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.llm.prompts import ChatTurn, alpaca_header, format_alpaca_example, render

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The data cannot be used as it is; the message lists the bad records."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    source: str  # file:line, for messages


@dataclass(frozen=True)
class BadRecord:
    source: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.problem}"


@dataclass
class FileReport:
    path: str
    sha256: str
    records: int = 0
    used: int = 0


@dataclass
class DataReport:
    files: list[FileReport] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    duplicates: int = 0
    train: int = 0
    eval: int = 0

    def summary(self) -> str:
        lines = [f"{f.path}: {f.records} records, {f.used} used (sha256 {f.sha256[:12]})" for f in self.files]
        lines.append(f"{len(self.bad)} bad records, {self.duplicates} exact duplicates dropped")
        lines.append(f"{self.train} for training, {self.eval} for evaluation")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [vars(f) for f in self.files],
            "bad_records": len(self.bad),
            "duplicates": self.duplicates,
            "train_records": self.train,
            "eval_records": self.eval,
        }


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: DataReport


def prepare_data(
    files: list[str],
    *,
    tokenizer: Any,
    system_prompt: str,
    prompt_template: str,
    max_length: int,
    eval_fraction: float,
    seed: int,
    skip_bad_records: bool = False,
    max_records: int | None = None,
) -> PreparedData:
    """Read, check, de-duplicate and split the data; raises DataError listing the bad records."""
    report = DataReport()
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()
    for name in files:
        path = Path(name)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read {name}: {error.strerror or error}") from None
        file_report = FileReport(path=name, sha256=hashlib.sha256(raw).hexdigest())
        report.files.append(file_report)
        for source, record in read_records(path, raw, report.bad):
            file_report.records += 1
            try:
                example = to_example(record, source, system_prompt, prompt_template, tokenizer)
                length = token_count(tokenizer, example)
                if length > max_length:
                    raise ValueError(
                        f"over-long: {length} tokens after tokenization, max_length is {max_length}"
                    )
            except ValueError as problem:
                report.bad.append(BadRecord(source, str(problem)))
                continue
            key = (example.prompt, example.completion)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            file_report.used += 1
            examples.append(example)
    if report.bad and not skip_bad_records:
        shown = "\n".join(f"  {bad}" for bad in report.bad[:20])
        more = f"\n  ... and {len(report.bad) - 20} more" if len(report.bad) > 20 else ""
        raise DataError(
            f"{len(report.bad)} bad records (fix them, or pass --skip-bad-records to leave them out):"
            f"\n{shown}{more}"
        )
    if max_records is not None:
        examples = examples[:max_records]
    if not examples:
        raise DataError("no usable records in " + ", ".join(files))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = round(len(examples) * eval_fraction) if len(examples) > 1 else 0
    eval_part = sorted(order[:held_out])
    train_part = sorted(order[held_out:])
    report.train, report.eval = len(train_part), len(eval_part)
    return PreparedData([examples[i] for i in train_part], [examples[i] for i in eval_part], report)


def token_count(tokenizer: Any, example: Example) -> int:
    # The trainer appends the end-of-text token to every completion, so count it too.
    text = example.prompt + example.completion
    return len(tokenizer.encode(text, add_special_tokens=False)) + 1


def to_example(record: Any, source: str, system_prompt: str, prompt_template: str, tokenizer: Any) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, not {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], source, system_prompt, prompt_template, tokenizer)
    for key in ("instruction", "output"):
        if key not in record or record[key] is None:
            raise ValueError(f"missing field '{key}'")
    for key in ("instruction", "input", "output"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise ValueError(f"field '{key}' must be text, not {type(record[key]).__name__}")
    instruction, given, output = record["instruction"], record.get("input") or "", record["output"]
    if not instruction.strip():
        raise ValueError("empty instruction")
    if not output.strip():
        raise ValueError("empty output")
    if prompt_template == "alpaca":
        prompt = alpaca_header(system_prompt) + format_alpaca_example(instruction, given)
    else:
        question = f"{instruction.strip()}\n\n{given.strip()}" if given.strip() else instruction
        prompt = render(
            tokenizer, [ChatTurn("system", system_prompt), ChatTurn("user", question)], prompt_template
        )
    return Example(prompt, output.strip(), source)


def _chat_example(
    messages: Any, source: str, system_prompt: str, prompt_template: str, tokenizer: Any
) -> Example:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {index + 1} needs a role of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index + 1} needs text content")
        turns.append(ChatTurn(message["role"], message["content"]))
    if turns[-1].role != "assistant" or not turns[-1].content.strip():
        raise ValueError("the last message must be a non-empty assistant answer")
    if len(turns) < 2 or turns[-2].role != "user":
        raise ValueError("the answer must follow a user message")
    context = turns[:-1] if turns[0].role == "system" else [ChatTurn("system", system_prompt), *turns[:-1]]
    return Example(render(tokenizer, context, prompt_template), turns[-1].content.strip(), source)


def read_records(path: Path, raw: bytes, bad: list[BadRecord]) -> Iterator[tuple[str, Any]]:
    """Yield (file:line, record) for each record; unreadable ones go to `bad`."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_records(path, raw, bad)
    elif suffix == ".jsonl" or (suffix == ".json" and not raw.lstrip().startswith(b"[")):
        yield from _jsonl_records(path, raw, bad)
    elif suffix == ".json":
        yield from _json_array_records(path, raw, bad)
    else:
        raise DataError(
            f"{path}: unknown data format {suffix or '(no extension)'}: use .json, .jsonl or .csv"
        )


def _jsonl_records(path: Path, raw: bytes, bad: list[BadRecord]) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(raw.split(b"\n"), start=1):
        source = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            bad.append(BadRecord(source, f"invalid UTF-8 at byte {error.start}"))
            continue
        if not text.strip():
            continue
        try:
            yield source, json.loads(text)
        except json.JSONDecodeError as error:
            bad.append(BadRecord(source, f"invalid JSON: {error.msg} (column {error.colno})"))


def _whole_file_text(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
    """Decode a file that is parsed as a whole; bad UTF-8 is reported with its line."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 at byte {error.start}; the whole file must be UTF-8"
        ) from None


def _json_array_records(path: Path, raw: bytes, bad: list[BadRecord]) -> Iterator[tuple[str, Any]]:
    text = _whole_file_text(path, raw)
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line, counted = 1, 0  # line numbers are counted as we go: finance-alpaca is one 40 MB array
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise DataError(f"{path}: the JSON array is not closed")
        if text[index] == "]":
            return
        line += text.count("\n", counted, index)
        counted = index
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
        yield f"{path}:{line}", record


def _csv_records(path: Path, raw: bytes, bad: list[BadRecord]) -> Iterator[tuple[str, Any]]:
    text = _whole_file_text(path, raw, "utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"instruction", "output"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path}:1: the header lacks the column(s) {', '.join(sorted(missing))}")
    for row in reader:
        yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
