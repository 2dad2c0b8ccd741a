"""safetensors checkpoints, single or sharded: validated before use, written with a SHA-256 manifest.

Never pickle. The header is checked by hand first (offsets inside the file, no overlaps, sizes that match the
shapes) so that a corrupt file gives a one-line error naming the problem instead of a crash deep in a reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinylm.errors import WeightsError
from tinylm.weights.fit import Stored

MANIFEST_NAME = "SHA256SUMS"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_MAX_JSON_DEPTH = 8  # a valid header nests 3 deep: the object, a tensor's entry, its shape list
_MAX_RANK = 16  # dims per tensor: torch's practical limit is far below anything a header could claim
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # possessive: linear time on any input
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CURLY_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by the index, or the single model.safetensors."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index}: unreadable shard index ({exc})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors weights in {folder} (tinylm never loads pickle .bin/.pt files)")
    return files


def read_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header; return {name: {"dtype", "shape", "data_offsets"}}.

    Checked as the safetensors library itself checks it, each failure one WeightsError line: a bounded length and
    nesting, the type of every field, non-negative integer shapes, offsets that tile the data buffer exactly (no
    overlap, no gap, nothing past the end) and spans that match shape x itemsize."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(f"{path.name}: header length {header_len} runs past the file ({size} bytes) or past "
                               f"the {_MAX_HEADER_BYTES >> 20} MB limit")
        header = _parse_header(path.name, handle.read(header_len))
    _check_metadata(path.name, header.pop("__metadata__", {}))
    _check_entries(path.name, header, size - 8 - header_len)
    return header


def _parse_header(file_name: str, raw: bytes) -> dict:
    if _nested_deeper_than(raw, _MAX_JSON_DEPTH):
        raise WeightsError(f"{file_name}: corrupt safetensors header (JSON brackets unbalanced or nested deeper than "
                           f"{_MAX_JSON_DEPTH} levels)")
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WeightsError(f"{file_name}: corrupt safetensors header ({_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file_name}: corrupt safetensors header (not a JSON object)")
    return header


def _nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON's brackets nest deeper than `limit` (or do not balance), found without parsing it: json's
    parser recurses once per level, so a header of a million '[' would end in a RecursionError. Strings are
    dropped first (brackets inside them do not nest); each pass then deletes the innermost pairs, so a balanced
    text of depth d is empty after d passes. Every step is a C-speed scan of at most 100 MB."""
    brackets = _JSON_STRING.sub(b"", raw).translate(_CURLY_TO_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: json.loads would silently keep the last of two same-named tensors."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return result


def _check_metadata(file_name: str, metadata: object) -> None:
    """`__metadata__` is a string -> string map, as safetensors requires."""
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{file_name}: corrupt safetensors header (__metadata__ must map strings to strings)")


def _check_entries(file_name: str, header: dict, data_bytes: int) -> None:
    spans = sorted(_entry_span(file_name, name, entry, data_bytes) for name, entry in header.items())
    _check_tiling(file_name, spans, data_bytes)


def _entry_span(file_name: str, name: str, entry: object, data_bytes: int) -> tuple[int, int, str]:
    """(start, end, name) of one checked header entry."""
    dtype, shape, (start, end) = _entry_fields(file_name, name, entry)
    if not start <= end <= data_bytes:
        raise WeightsError(
            f"{file_name}: tensor {name!r} offsets {start}..{end} run past the data ({data_bytes} bytes): "
            "the file is truncated or corrupt"
        )
    needed = math.prod(shape) * _DTYPE_BYTES[dtype]
    if end - start != needed:
        raise WeightsError(f"{file_name}: tensor {name!r} spans {end - start} bytes, shape {shape} needs {needed}")
    return start, end, name


def _entry_fields(file_name: str, name: str, entry: object) -> tuple[str, list[int], list[int]]:
    """dtype, shape and data_offsets of an entry, each of the type safetensors requires."""
    def bad(what: str, value: object) -> WeightsError:
        return WeightsError(f"{file_name}: malformed header entry for tensor {name!r}: {what}, got {_short(value)}")
    if not isinstance(entry, dict):
        raise bad("an entry must be a JSON object", entry)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("dtype must be a string", dtype)
    if dtype not in _DTYPE_BYTES:
        raise WeightsError(f"{file_name}: tensor {name!r} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_size(d) for d in shape):
        raise bad(f"shape must be a list of at most {_MAX_RANK} non-negative integers", shape)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise bad("data_offsets must be two non-negative integers", offsets)
    return dtype, shape, offsets


def _is_size(value: object) -> bool:
    """A non-negative integer that fits the u64 safetensors stores (bool is an int subclass but not a size)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _check_tiling(file_name: str, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The sorted spans must cover the data buffer exactly: an overlap lets one tensor read another's bytes, and
    a gap or a tail means the offsets are not the ones the writer wrote."""
    position, previous = 0, None
    for start, end, name in spans:
        if start < position:
            raise WeightsError(f"{file_name}: tensors {previous!r} and {name!r} overlap in the file")
        if start > position:
            raise WeightsError(f"{file_name}: data bytes {position}..{start} belong to no tensor (before {name!r}): "
                               "the header is corrupt")
        position, previous = end, name
    if position != data_bytes:
        raise WeightsError(f"{file_name}: the header covers {position} of the {data_bytes} data bytes: the file is "
                           "corrupt or has bytes appended")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


FLOAT_DTYPES = ("F32", "F16", "BF16")


def load_checkpoint(folder: Path, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset(),
                    rename: Callable[[str], str | None] = lambda name: name,
                    allowed_dtypes: tuple[str, ...] = FLOAT_DTYPES) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint folder after checking names, shapes and dtypes against `expected`.

    `rename` maps a stored name to the module name (None: skip the tensor, e.g. a precomputed rotary table);
    `optional` module names may be absent (a tied lm_head). Returns tensors under module names.
    """
    verify_manifest(folder)
    files = checkpoint_files(folder)
    found = {}  # module name -> (file, stored name, header entry)
    for path in files:
        for stored, entry in read_header(path).items():
            name = rename(stored)
            if name is not None:
                found[name] = (path, stored, entry)
    _check_names(folder, expected, optional, found)
    for name, (path, stored, entry) in found.items():
        if tuple(entry["shape"]) != tuple(expected[name]):
            raise WeightsError(f"{path.name}: tensor {stored!r} has shape {tuple(entry['shape'])}, "
                               f"the config needs {tuple(expected[name])}")
        if entry["dtype"] not in allowed_dtypes:
            raise WeightsError(f"{path.name}: tensor {stored!r} has dtype {entry['dtype']}, "
                               f"expected one of {', '.join(allowed_dtypes)}")
    return _read_tensors(files, {(path, stored): name for name, (path, stored, _) in found.items()})


def stored_shapes(folder: Path, rename: Callable[[str], str | None]) -> dict[str, Stored]:
    """Module name -> (stored name, shape) of every tensor in the folder's headers; no data is read. This is what
    the config is checked against (tinylm.weights.fit) before a model is built from it."""
    shapes = {}
    for path in checkpoint_files(folder):
        for stored, entry in read_header(path).items():
            name = rename(stored)
            if name is not None:
                shapes[name] = Stored(stored, tuple(entry["shape"]))
    return shapes


def _read_tensors(files: list[Path], wanted: dict[tuple[Path, str], str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as reader:
                for stored in reader.keys():
                    if (path, stored) in wanted:
                        tensors[wanted[path, stored]] = reader.get_tensor(stored)
        except Exception as exc:  # safetensors raises its own error types; name the file instead
            raise WeightsError(f"{path.name}: cannot read safetensors data ({exc})") from None
    return tensors


def _check_names(folder: Path, expected: dict, optional: set[str], found: dict) -> None:
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise WeightsError(f"{folder}: missing tensors {_short_list(missing)}")
    if unexpected:
        raise WeightsError(f"{folder}: unexpected tensors {_short_list(unexpected)} (wrong config or architecture?)")


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write model.safetensors (contiguous copies, shared storage broken) and refresh the SHA-256 manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    plain = {name: t.detach().contiguous().clone() if _shares_storage(t, tensors) else t.detach().contiguous()
             for name, t in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes through a private temp file (0600); give it normal permissions
    write_manifest(folder)
    return path


def _shares_storage(tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return sum(1 for t in tensors.values() if t.untyped_storage().data_ptr() == ptr) > 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """SHA256SUMS in `sha256sum` format over every file of the folder, so `sha256sum -c` checks it too."""
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")]
    manifest = folder / MANIFEST_NAME
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, manifest)
    return manifest


def verify_manifest(folder: Path) -> None:
    """Check every file a SHA256SUMS manifest lists, when the folder has one."""
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        return
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        path = folder / name.strip()
        if "/" in name or not path.is_file():
            raise WeightsError(f"{manifest}: lists {name!r}, which is not in the folder")
        if sha256_file(path) != digest.strip().lower():
            raise WeightsError(f"{path.name}: SHA-256 does not match {MANIFEST_NAME}: the file is corrupt or changed")
