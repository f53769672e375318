"""Read rows from JSONL, JSON, Parquet and CSV files and `datasets` folders, one at a time, remembering where
each came from.

Each row carries its origin ("file.jsonl:12") so that every later error can point at it. Files are read
incrementally: a file larger than memory can be streamed through tokenisation. JSON Lines are split on "\\n"
only, since JSON allows U+2028, U+0085 and the other Unicode line separators raw inside strings; CSV is parsed
from the file itself, so a quoted field may hold line breaks (a row's origin is the line it starts on).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
JSON_BLOCK = 1 << 22  # characters of a .json array decoded at a time
PARQUET_BATCH = 1024
TOO_DEEP = "malformed JSON (values nested too deeply to read)"


@dataclass
class Row:
    fields: dict[str, Any]
    origin: str  # "path:line" for text files, "path:row N" otherwise


def read_rows(paths: list[str]) -> list[Row]:
    """Every row of `paths`, in order (for small files: evaluation sets, prompts)."""
    return list(iter_rows(paths))


def iter_rows(paths: list[str]) -> Iterator[Row]:
    if not paths:
        raise UserError("no data given: set 'data' (a file or a list of files)")
    for path in paths:
        yield from read_source(Path(path))


def require(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: data file not found")


def read_source(path: Path) -> Iterator[Row]:
    require(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown data file type '{suffix}' (use {', '.join(SUFFIXES)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    reader = {".parquet": _read_parquet, ".csv": _read_csv, ".json": _read_json}.get(suffix, _read_jsonl)
    count = 0
    for row in reader(path):
        count += 1
        yield row
    if not count:
        raise UserError(f"{path}: holds no rows")


def _decode(path: Path, data: bytes, line: int) -> str:
    """`data` as text; `line` is the line number of its first byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line += data.count(b"\n", 0, err.start)
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def _as_row(value: Any, origin: str) -> Row:
    if not isinstance(value, dict):
        raise UserError(f"{origin}: a row must be a JSON object, got {type(value).__name__}")
    return Row(value, origin)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, split on b"\\n" alone; a leading byte-order mark is dropped."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield number, _decode(path, raw, number)


def _read_jsonl(path: Path) -> Iterator[Row]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: {TOO_DEEP}") from None
        yield _as_row(value, f"{path}:{number}")


# A .json file holds a list of rows, a one-key object around one ({"train": [...]}), or JSON Lines.
_WRAPPED_LIST = re.compile(r'\s*\{\s*"(?:[^"\\]|\\.)*"\s*:\s*\[')
_BETWEEN = re.compile(r"\s*,?\s*")


class _JsonText:
    """A .json file's text, decoded from UTF-8 block by block as the parser asks for more."""

    def __init__(self, path: Path):
        self.path, self.file = path, path.open("rb")
        self.text, self.line, self.eof, self.pending = "", 1, False, b""

    def more(self) -> bool:
        """Append the next block; False at the end of the file."""
        if self.eof:
            return False
        block = self.pending + self.file.read(JSON_BLOCK)
        self.eof = len(block) == len(self.pending)
        cut = len(block) if self.eof else _utf8_boundary(block)
        if self.line == 1 and not self.text and block.startswith(b"\xef\xbb\xbf"):
            block, cut = block[3:], cut - 3
        self.pending = block[cut:]
        self.text += _decode(self.path, block[:cut], self.line_of(len(self.text)))
        return True

    def drop_before(self, at: int) -> int:
        """Forget the text before `at` (counting its lines); returns the new index of `at`."""
        self.line += self.text.count("\n", 0, at)
        self.text = self.text[at:]
        return 0

    def line_of(self, at: int) -> int:
        return self.line + self.text.count("\n", 0, at)

    def close(self) -> None:
        self.file.close()


def _utf8_boundary(block: bytes) -> int:
    """The length of `block` without a UTF-8 sequence cut at its end."""
    for back in range(1, min(4, len(block)) + 1):
        byte = block[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence complete?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            return len(block) if need <= back else len(block) - back
    return len(block)


def _read_json(path: Path) -> Iterator[Row]:
    if _first_char(path) == "{":
        first = next(line for _, line in _lines(path) if line.strip())
        try:
            value = json.loads(first)
        except (json.JSONDecodeError, RecursionError):
            value = None  # an object over several lines: a wrapped list, or not a data file
        if value is not None:
            if _non_blank_lines(path, stop_after=2) > 1:
                yield from _read_jsonl(path)
            else:
                yield from _rows_of(path, value)
            return
    source = _JsonText(path)
    try:
        while not source.text.strip() and source.more():
            pass
        if source.text.lstrip().startswith("["):
            yield from _json_list(source, source.text.index("[") + 1)
        elif (match := _WRAPPED_LIST.match(source.text)) is not None:
            yield from _json_list(source, match.end(), wrapped=True)
        else:
            try:
                value = json.loads(_decode(path, path.read_bytes(), 1).lstrip("\ufeff"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise UserError(f"{path}: {TOO_DEEP}") from None
            yield from _rows_of(path, value)
    finally:
        source.close()


def _first_char(path: Path) -> str:
    with path.open("rb") as file:
        while block := file.read(4096):
            text = block.lstrip(b"\xef\xbb\xbf \t\r\n")
            if text:
                return chr(text[0])
    return ""


def _non_blank_lines(path: Path, stop_after: int) -> int:
    count = 0
    for _, line in _lines(path):
        count += bool(line.strip())
        if count >= stop_after:
            break
    return count


def _rows_of(path: Path, value: Any) -> Iterator[Row]:
    """The rows of a whole JSON value: a list, or a one-key object around a list ({"train": [...]})."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise UserError(f"{path}: a JSON data file must hold a list of rows")
    for i, item in enumerate(value):
        yield _as_row(item, f"{path}:row {i + 1}")


def _json_list(source: _JsonText, at: int, wrapped: bool = False) -> Iterator[Row]:
    """The rows of a list, decoded one at a time from the file's text."""
    decoder, path, index = json.JSONDecoder(), source.path, 0
    while True:
        at = _BETWEEN.match(source.text, at).end()
        if at >= len(source.text) - 1 and source.more():
            continue
        if source.text.startswith("]", at):
            while source.more():
                pass
            if source.text[at + 1:].strip() != ("}" if wrapped else ""):
                raise UserError(f"{path}:{source.line_of(at)}: malformed JSON (extra data after the list of rows)")
            return
        try:
            value, end = decoder.raw_decode(source.text, at)
        except json.JSONDecodeError as err:
            if source.more():
                continue
            raise UserError(f"{path}:{source.line_of(err.pos)}: malformed JSON ({err.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{source.line_of(at)}: {TOO_DEEP}") from None
        if end == len(source.text) and source.more():
            continue  # a number or literal cut at the block's end may go on
        index += 1
        yield _as_row(value, f"{path}:row {index}")
        at = source.drop_before(end) if end > JSON_BLOCK else end


def _read_csv(path: Path) -> Iterator[Row]:
    csv.field_size_limit(1 << 30)  # the module's default, 128 KiB a field, is shorter than many a reply
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        start = 2  # the header is line 1
        try:
            for record in reader:
                if None in record:
                    raise UserError(f"{path}:{start}: more values than header columns")
                yield Row(dict(record), f"{path}:{start}")
                start = reader.line_num + 1
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{reader.line_num + 1}: not UTF-8 text (byte 0x{err.object[err.start]:02x})"
                            ) from None
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                index += 1
                yield Row(record, f"{path}:row {index}")
    except UserError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None


def _read_saved_dataset(path: Path) -> Iterator[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: not a dataset folder saved with save_to_disk ({err})") from None
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: a DatasetDict needs a 'train' split (has {', '.join(loaded)})")
        loaded = loaded["train"]
    assert isinstance(loaded, Dataset)
    for i, record in enumerate(loaded):
        yield Row(record, f"{path}:row {i + 1}")


def file_fingerprint(paths: list[str]) -> str:
    """Identifies the data's content for the tokenisation cache: path, size and mtime of each file."""
    parts = []
    for raw in paths:
        path = Path(raw)
        require(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            parts.append(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)
