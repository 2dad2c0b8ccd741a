"""Reading evaluation data: JSON Lines, parquet and header-less CSV rows, and plain-text documents for perplexity.

pyarrow (the optional extra `tinylm[eval]`) is imported only when a parquet file is read. Every problem with a file
ends in an EvalDataError naming the file and, where there is one, the row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tinylm.errors import TinyLMError


class EvalDataError(TinyLMError, ValueError):
    """A task or data file that is missing, unreadable, or holds a malformed row; or an unknown task name."""


def read_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl (one JSON object per line) or .parquet file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    raise EvalDataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


def _read_csv(path: Path) -> list[dict]:
    """Header-less CSV rows (MMLU's original release: question, A, B, C, D, answer), each as {"columns": [...],
    "file": the file's stem} (the stem names the MMLU subject: abstract_algebra_test)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [{"columns": values, "file": path.stem} for values in csv.reader(handle) if values]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: cannot read as CSV: {e}") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: cannot read: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(f"{path}: reading parquet needs pyarrow: pip install 'tinylm[eval]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise EvalDataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None


def read_documents(path: Path, field: str = "text") -> list[str]:
    """Documents for perplexity: a text file is one document; JSONL and parquet give one per row (`field`)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        try:
            return [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise EvalDataError(f"{path}: cannot read as UTF-8 text: {e}") from None
    docs = []
    for number, row in enumerate(read_rows(path), 1):
        value = row.get(field)
        if not isinstance(value, str):
            what = "has no" if value is None else f"has a non-text ({type(value).__name__})"
            raise EvalDataError(f"{path}: row {number} {what} {field!r} field (choose the text field with --field)")
        docs.append(value)
    return docs
