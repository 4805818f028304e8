"""Where rows come from: a data path (a file, a saved or Hub-layout directory, s3://…, a Hub dataset id) read as
a stream of numbered rows, so that a check can name the row it stops at and never holds the whole file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from orchestrator.errors import PreflightError, first_line
from orchestrator.spec import DataSpec

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class BadRow(Exception):
    """A row that cannot be used; the message says why (the caller adds the file and the row number)."""


Row = Union[dict, BadRow]  # a row as read, or why it could not be read


@dataclass
class Source:
    """A data path, opened: its rows, numbered from 1 (a JSON-lines file: by line), and what identifies its content."""

    path: str
    columns: list[str] | None  # known before reading for typed sources; JSON's come from its rows
    rows: Callable[[], Iterator[tuple[int, Row]]]
    fingerprint: str  # changes when the content does: part of the data cache's key


def storage_options(path: str) -> dict[str, Any] | None:
    if not path.startswith("s3://"):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def open_source(path: str, spec: DataSpec, where: str) -> Source:
    """`path` ready to read. `where` names the spec field in errors (data.path, data.eval_path)."""
    options = storage_options(path)
    suffix = next((s for s in _FILE_FORMATS if path.endswith(s)), None)
    if options is None and not os.path.exists(path):
        if suffix is None and not path.startswith(("/", ".", "~")) and _HUB_ID.fullmatch(path):
            return _typed_source(path, lambda: _load_hub(path, spec), where,
                                 failure=f"{path} is no local file or directory, and no Hub dataset could be loaded")
        raise PreflightError(f"{where}: {path} does not exist")
    if options is None and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise PreflightError(f"{where}: {path} is empty")
    if options is None and os.path.isdir(path):
        return _typed_source(path, lambda: _load_directory(path, spec, where), where)
    if suffix is None:
        raise PreflightError(f"{where}: {path}: unknown format (use .jsonl, .json, .parquet, .csv, a saved dataset "
                             f"directory, a Hub-layout directory or a Hub dataset id)")
    if _FILE_FORMATS[suffix] == "json":
        return Source(path, None, lambda: _json_rows(path, options, where), _file_fingerprint(path, options, where))
    return _typed_source(path, lambda: _load_file(path, _FILE_FORMATS[suffix], options), where)


def _typed_source(path: str, load: Callable[[], Any], where: str, failure: str = "") -> Source:
    """A source `datasets` reads (parquet, csv, a directory, the Hub): typed columns, rows numbered from 1."""
    import datasets

    datasets.disable_progress_bars()
    try:
        table = load()
    except PreflightError:
        raise
    except Exception as error:  # datasets raises many types for unreadable data
        raise PreflightError(f"{where}: {failure or 'cannot read ' + path}: {first_line(error)}") from None

    def rows() -> Iterator[tuple[int, Row]]:
        number = 0
        for batch in table.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                number += 1
                yield number, dict(zip(columns, values))

    return Source(path, list(table.column_names), rows, table._fingerprint)


def _load_file(path: str, builder: str, options):
    import datasets

    return datasets.load_dataset(builder, data_files=path, split="train", storage_options=options)


def _load_directory(path: str, spec: DataSpec, where: str):
    import datasets

    if not any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):
        return _load_hub(path, spec)  # laid out like a Hub dataset: data/train-*.parquet, …
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise PreflightError(f"data.split: {path} has no split {spec.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[spec.split]
    return loaded


def _load_hub(path: str, spec: DataSpec):
    import datasets

    return datasets.load_dataset(path, name=spec.subset, split=spec.split)


def _file_fingerprint(path: str, options, where: str) -> str:
    import fsspec

    try:
        filesystem, location = fsspec.core.url_to_fs(path, **(options or {}))
        info = filesystem.info(location)
    except FileNotFoundError:
        raise PreflightError(f"{where}: {path} does not exist") from None
    except Exception as error:
        raise PreflightError(f"{where}: cannot read {path}: {first_line(error)}") from None
    if info.get("size") == 0:
        raise PreflightError(f"{where}: {path} is empty")
    changed = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    return json.dumps([path, info.get("size"), str(changed)])


def _json_rows(path: str, options, where: str) -> Iterator[tuple[int, Row]]:
    """A JSON-lines file line by line (one bad line is one bad row), or a file holding one JSON array."""
    import fsspec

    with fsspec.open(path, "rb", **(options or {})) as stream:
        start = stream.read(64).lstrip()
        stream.seek(0)
        if start.startswith(b"["):
            yield from enumerate(_json_array(stream.read(), path, where), start=1)
            return
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, json_row(line.rstrip(b"\r\n"))


def json_row(line: bytes) -> Row:
    """One JSON-lines row: an object, or why not (decoded here, so that a bad byte names its row)."""
    try:
        row = json.loads(line.decode("utf-8-sig"))  # decoded here: json.loads(bytes) first guesses the encoding
    except UnicodeDecodeError as error:
        return BadRow(f"not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1})")
    except json.JSONDecodeError as error:
        return BadRow(f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(row, dict):
        return BadRow(f"a JSON {type(row).__name__}, not an object")
    return row


def _json_array(data: bytes, path: str, where: str) -> list[Row]:
    try:
        rows = json.loads(data)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PreflightError(f"{where}: {path} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x})") from None
    except json.JSONDecodeError as error:
        raise PreflightError(f"{where}: {path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(rows, list):
        raise PreflightError(f"{where}: {path} holds a JSON {type(rows).__name__}; use a list of rows or JSON lines")
    return [row if isinstance(row, dict) else BadRow(f"a JSON {type(row).__name__}, not an object") for row in rows]
