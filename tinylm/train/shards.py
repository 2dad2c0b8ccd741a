"""Pretraining text, tokenized once into memory-mapped token shards (numpy memmap, uint16 or uint32 by vocab size).

A shard folder is named by a hash of its inputs (file paths, sizes and mtimes, the tokenizer, the settings), written
to a temporary folder and renamed into place, so a second run (or another rank) opens it instead of tokenizing again,
and an interrupted tokenization is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinylm.errors import TinyLMError

_VERSION = 1  # bump when the shard layout or document rules change
_LINES_PER_CHUNK = 2000  # .txt files are tokenized in chunks of lines, so a large file never sits in memory twice


class DataError(TinyLMError, ValueError):
    """Training data that cannot be read: missing file, bad JSON line, missing field, empty data."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenShards:
    """The token stream of a shard folder, read through memmaps: `read(start, stop)` spans shard boundaries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(folder / name, dtype=dtype, mode="r", shape=(count,))
                       for name, count in zip(self.meta["files"], self.meta["counts"]) if count]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # (S+1,) start of each shard in the stream

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64."""
        parts = []
        index = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            shard = self.shards[index]
            local = start - int(self.offsets[index])
            take = min(stop - start, len(shard) - local)
            parts.append(np.asarray(shard[local:local + take], dtype=np.int64))
            start += take
            index += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_shards(files: list[str], tokenizer, cache_dir: Path, text_field: str, vocab_size: int,
                 shard_tokens: int) -> Path:
    """Tokenize `files` into `cache_dir/<hash>/` unless that folder already exists; return the folder."""
    paths = [_existing(f) for f in files]
    key = _cache_key(paths, tokenizer, text_field, vocab_size)
    folder = cache_dir / f"tokens-{key[:16]}"
    if (folder / "meta.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = _write_shards(tmp, _documents(paths, text_field), tokenizer, token_dtype(vocab_size), shard_tokens)
    if not sum(meta["counts"]):
        shutil.rmtree(tmp)
        raise DataError(f"no text in {', '.join(files)}")
    meta.update(key=key, sources=[str(p) for p in paths])
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if folder.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder


def _existing(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise DataError(f"data file {name} does not exist")
    return path.resolve()


def _cache_key(paths: list[Path], tokenizer, text_field: str, vocab_size: int) -> str:
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    tok = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    blob = json.dumps([_VERSION, stats, tok, tokenizer.eos_token_id, text_field, vocab_size])
    return hashlib.sha256(blob.encode()).hexdigest()


def _documents(paths: list[Path], text_field: str) -> Iterator[list[str]]:
    """Each document as a list of text chunks: a .txt file is one document, a .jsonl line is one."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from ([text] for text in _jsonl_texts(path, text_field))
        else:
            yield from _txt_chunks(path)


def _txt_chunks(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        chunks, lines = [], []
        for line in handle:
            lines.append(line)
            if len(lines) == _LINES_PER_CHUNK:
                chunks.append("".join(lines))
                lines = []
        chunks.append("".join(lines))
    yield [c for c in chunks if c]


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{number}: not valid JSON ({exc.msg})") from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path.name}:{number}: no string field {text_field!r} (set data.text_field)")
            yield text


def _write_shards(folder: Path, documents: Iterator[list[str]], tokenizer, dtype: np.dtype,
                  shard_tokens: int) -> dict:
    """Documents are tokenized (BOS if the tokenizer's post-processor adds one) and each is followed by EOS."""
    eos = tokenizer.eos_token_id
    files, counts, buffer, documents_seen = [], [], [], 0

    def flush(final: bool) -> None:
        while len(buffer) >= shard_tokens or (final and buffer):
            chunk = np.asarray(buffer[:shard_tokens], dtype=dtype)
            del buffer[:shard_tokens]
            name = f"shard-{len(files):05d}.bin"
            chunk.tofile(folder / name)
            files.append(name)
            counts.append(len(chunk))

    for chunks in documents:
        encodings = tokenizer.backend.encode_batch(chunks, add_special_tokens=False)
        ids = [i for enc in encodings for i in enc.ids]
        if tokenizer.bos_token_id is not None and _adds_bos(tokenizer):
            ids.insert(0, tokenizer.bos_token_id)
        buffer.extend(ids + ([eos] if eos is not None else []))
        documents_seen += 1
        flush(final=False)
    flush(final=True)
    return {"version": _VERSION, "dtype": dtype.name, "files": files, "counts": counts, "documents": documents_seen}


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor puts BOS first (Llama-style), as encode() would."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id
