"""The data formats and the one rule that decides whether a row is usable.

Preflight (on the driver) and the workers read rows through `usable_rows` alone, so that with
`data.bad_rows: skip` both leave out exactly the same rows. A usable row comes out in one of three
canonical shapes — {text}, {prompt, completion} or {messages: [{role, content}]} — with its row number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from orchestrator.errors import PreflightError
from orchestrator.spec import CHAT_FORMATS, DataSpec
from orchestrator.train.sources import BadRow, Source

IGNORE_INDEX = -100  # the label of a token the loss skips (transformers' convention)
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names (as LLaMA-Factory and Axolotl read them) → OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool"}
ALPACA_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Layout:
    """A resolved format and the source fields it reads."""

    format: str
    fields: tuple[str, ...]

    @property
    def shape(self) -> str:
        """The canonical shape its rows take: text, prompt_completion or chat."""
        return "chat" if self.format in CHAT_FORMATS else self.format


@dataclass
class DataCheck:
    """What reading one data path found; filled as its rows are read."""

    rows: int = 0          # rows read, usable or not
    skipped: int = 0       # rows left out under data.bad_rows: skip
    first_skipped: str = ""  # "row 101: …", the first one left out

    def note(self, where: str, path: str) -> Optional[str]:
        if not self.skipped:
            return None
        return (f"{where}: skipped {self.skipped:,} of {self.rows:,} rows of {path} (data.bad_rows: skip); "
                f"the first, {self.first_skipped}")


def detect_layout(spec: DataSpec, columns: Sequence[str], where: str, path: str) -> Layout:
    """The format named by the spec or, without one, the one the columns fit (see DataSpec.format)."""
    fmt = spec.format
    if fmt is None and spec.text_field is not None:
        fmt = "text"
    if fmt is None and (spec.prompt_field in columns and spec.completion_field in columns
                        or (spec.prompt_field, spec.completion_field) != ("prompt", "completion")):
        fmt = "prompt_completion"  # present, or named by the user: read as asked
    if fmt is None:
        fits = [name for name, needed in (("messages", ("messages",)), ("sharegpt", ("conversations",)),
                                          ("alpaca", ("instruction", "output")), ("text", ("text",)))
                if all(c in columns for c in needed)]
        if len(fits) > 1:
            raise PreflightError(f"data.format: {path} could be {' or '.join(fits)} (columns: {', '.join(columns)}); "
                                 f"set data.format")
        fmt = fits[0] if fits else "prompt_completion"
    if fmt == "text":
        layout = Layout(fmt, (spec.text_field or "text",))
    elif fmt == "prompt_completion":
        layout = Layout(fmt, (spec.prompt_field or "prompt", spec.completion_field or "completion"))
    elif fmt == "alpaca":
        layout = Layout(fmt, ALPACA_FIELDS)
    else:
        layout = Layout(fmt, (spec.messages_field or ("conversations" if fmt == "sharegpt" else "messages"),))
    if columns:  # else no row could be read: the rows themselves will say why
        _check_columns(layout, spec, columns, path)
    return layout


def _check_columns(layout: Layout, spec: DataSpec, columns: Sequence[str], path: str) -> None:
    option = {"text": ("text_field",), "prompt_completion": ("prompt_field", "completion_field"),
              "alpaca": ("format",) * 3, "messages": ("messages_field",), "sharegpt": ("messages_field",)}[layout.format]
    for name, column in zip(option, layout.fields):
        if column not in columns and column != "input":  # alpaca's input is optional
            hint = "" if spec.format else "; or set data.format (prompt_completion, text, messages, alpaca, sharegpt)"
            raise PreflightError(f"data.{name}: {column!r} is not a column of {path} "
                                 f"(columns: {', '.join(columns)}){hint}")


class RowRule:
    """A raw row → its canonical form, or BadRow saying why it cannot be used."""

    def __init__(self, layout: Layout, train_on: str, template_problem: Callable[[list[dict]], Optional[str]] | None):
        self.layout, self.train_on, self.template_problem = layout, train_on, template_problem

    def canonical(self, raw: dict, number: int) -> dict:
        fmt, fields = self.layout.format, self.layout.fields
        if fmt == "text":
            return {"row": number, "text": text_of(raw, fields[0])}
        if fmt == "prompt_completion":
            return {"row": number, "prompt": text_of(raw, fields[0]), "completion": text_of(raw, fields[1])}
        messages = alpaca_messages(raw) if fmt == "alpaca" else conversation(raw, fields[0], fmt == "sharegpt")
        if self.train_on != "all" and not any(m["role"] == "assistant" for m in messages):
            raise BadRow(f"no assistant message to train on (data.train_on: {self.train_on})")
        problem = self.template_problem(messages) if self.template_problem else None
        if problem:
            raise BadRow(problem)
        return {"row": number, "messages": messages}


def text_of(raw: dict, field: str, optional: bool = False) -> str:
    """A field's text. Numbers count (CSV columns load as numbers); null, NaN, lists and objects do not."""
    if field not in raw:
        if optional:
            return ""
        raise BadRow(f"has no field {field!r}")
    value = raw[field]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value)):
        return str(value)
    if value is None or isinstance(value, float):
        if optional:
            return ""
        raise BadRow(f"{field!r} is null")
    raise BadRow(f"{field!r} holds {_kind(value)}, not text")


def conversation(raw: dict, field: str, sharegpt: bool) -> list[dict]:
    """The row's conversation as [{role, content}]: OpenAI messages, or ShareGPT's [{from, value}] mapped to roles."""
    if field not in raw or raw[field] is None:
        raise BadRow(f"has no {field!r}" if field not in raw else f"{field!r} is null")
    turns = raw[field]
    if not isinstance(turns, list):
        raise BadRow(f"{field!r} holds {_kind(turns)}, not a list of messages")
    if not turns:
        raise BadRow(f"{field!r} is an empty conversation")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    system = raw.get("system") if sharegpt else None  # LLaMA-Factory's ShareGPT puts the system prompt beside
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"message {index} holds {_kind(turn)}, not an object with {role_key} and {content_key}")
        speaker = turn.get(role_key)
        role = SHAREGPT_ROLES.get(speaker) if sharegpt else (speaker if speaker in ROLES else None)
        if role is None:
            known = ", ".join(SHAREGPT_ROLES if sharegpt else ROLES)
            raise BadRow(f"message {index}: unknown {role_key} {speaker!r} (known: {known})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise BadRow(f"message {index} ({speaker}) has " + ("no " + content_key if content is None else
                                                                 f"{_kind(content)} as {content_key}, not text"))
        messages.append({"role": role, "content": content})
    return messages


def alpaca_messages(raw: dict) -> list[dict]:
    """Alpaca's instruction (+ input) as the user's turn, its output as the assistant's."""
    instruction, extra, output = (text_of(raw, field, optional=field == "input") for field in ALPACA_FIELDS)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    system = raw.get("system")
    return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _kind(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}")


def first_columns(source: Source, sample: int = 100) -> list[str]:
    """The columns of a source: its own, or (JSON) every field of its first `sample` readable rows, so that a
    field missing from a few rows is their problem (a bad row) and one missing from all is the spec's."""
    if source.columns is not None:
        return source.columns
    columns: dict[str, None] = {}
    readable = (row for _, row in source.rows() if isinstance(row, dict))
    for _, row in zip(range(sample), readable):
        columns.update(dict.fromkeys(row))
    return list(columns)


def usable_rows(source: Source, rule: RowRule, bad_rows: str, where: str, check: DataCheck) -> Iterator[dict]:
    """The source's usable rows in canonical form. A bad row stops everything with one line naming the file and
    row (bad_rows: error), or is counted in `check` and left out (skip)."""
    for number, raw in source.rows():
        check.rows += 1
        try:
            if isinstance(raw, BadRow):
                raise raw
            yield rule.canonical(raw, number)
        except BadRow as problem:
            if bad_rows == "error":
                raise PreflightError(f"{where}: {source.path} row {number}: {problem}") from None
            check.skipped += 1
            check.first_skipped = check.first_skipped or f"row {number}: {problem}"
    if check.rows == check.skipped:
        what = "holds no examples" if check.rows == 0 else f"has no usable row ({check.first_skipped})"
        raise PreflightError(f"{where}: {source.path} {what}")
