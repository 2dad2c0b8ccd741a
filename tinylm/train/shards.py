"""Pretraining text, tokenized once into memory-mapped token shards (numpy memmap, uint16 or uint32 by vocab size).

A shard folder is named by a hash of its inputs (file paths, sizes and mtimes, the tokenizer, the settings), written
to a temporary folder and renamed into place, so a second run (or another rank) opens it instead of tokenizing again,
and an interrupted tokenization is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinylm.errors import TinyLMError

_VERSION = 1  # bump when the shard layout or document rules change
_LINES_PER_CHUNK = 2000  # .txt files are streamed in chunks of lines: a large file never sits in memory whole
_PIECES_PER_BATCH = 256  # texts per encode_batch call (the tokenizer's threads work on a batch)


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
        """Tokens [start, stop) of the stream as int64 (stop is clamped to the end)."""
        parts, stop = [], min(stop, len(self))
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
    meta = _write_shards(tmp, _pieces(paths, text_field), tokenizer, token_dtype(vocab_size), shard_tokens)
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


def _pieces(paths: list[Path], text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document): a .jsonl line is a document; a .txt file is one, streamed in chunks of lines."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from ((text, True) for text in _jsonl_texts(path, text_field))
        else:
            yield from _txt_chunks(path)


def _txt_chunks(path: Path) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        pending = None
        while lines := list(itertools.islice(handle, _LINES_PER_CHUNK)):
            if pending is not None:
                yield pending, False
            pending = "".join(lines)
        if pending is not None:
            yield pending, True


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


class _ShardWriter:
    """Buffers token arrays and writes full shards of `shard_tokens` (the last one may be shorter)."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.size = folder, dtype, shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[str] = []
        self.counts: list[int] = []

    def add(self, ids: list[int]) -> None:
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        while self.buffered >= self.size:
            self._write(self.size)

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, count: int) -> None:
        tokens = np.concatenate(self.parts)
        name = f"shard-{len(self.files):05d}.bin"
        tokens[:count].tofile(self.folder / name)
        self.files.append(name)
        self.counts.append(count)
        self.parts, self.buffered = [tokens[count:]], len(tokens) - count


def _write_shards(folder: Path, pieces: Iterator[tuple[str, bool]], tokenizer, dtype: np.dtype,
                  shard_tokens: int) -> dict:
    """Each document: BOS first if the tokenizer's post-processor adds one, its tokens, then EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    writer, documents, at_start = _ShardWriter(folder, dtype, shard_tokens), 0, True
    while group := list(itertools.islice(pieces, _PIECES_PER_BATCH)):
        encodings = tokenizer.backend.encode_batch([text for text, _ in group], add_special_tokens=False)
        for (_, ends), encoding in zip(group, encodings):
            writer.add((bos if at_start else []) + encoding.ids + (eos if ends else []))
            documents += ends
            at_start = ends
    writer.close()
    return {"version": _VERSION, "dtype": dtype.name, "files": writer.files, "counts": writer.counts,
            "documents": documents}


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor puts BOS first (Llama-style), as encode() would."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id
