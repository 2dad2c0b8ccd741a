"""safetensors checkpoints, single or sharded: validated before use, written with a SHA-256 manifest.

Never pickle. The header is checked by hand first (offsets inside the file, no overlaps, sizes that match the
shapes) so that a corrupt file gives a one-line error naming the problem instead of a crash deep in a reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinylm.errors import WeightsError

MANIFEST_NAME = "SHA256SUMS"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
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
    """Parse and validate a safetensors header; return {name: {"dtype", "shape", "data_offsets"}}."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(f"{path.name}: header length {header_len} runs past the file ({size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{path.name}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    _check_entries(path.name, header, size - 8 - header_len)
    return header


def _check_entries(file_name: str, header: dict, data_bytes: int) -> None:
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file_name}: malformed header entry for tensor {name!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise WeightsError(f"{file_name}: tensor {name!r} has unknown dtype {dtype!r}")
        if not 0 <= start <= end <= data_bytes:
            raise WeightsError(
                f"{file_name}: tensor {name!r} offsets {start}..{end} run past the data ({data_bytes} bytes): "
                "the file is truncated or corrupt"
            )
        if end - start != numel * _DTYPE_BYTES[dtype]:
            raise WeightsError(f"{file_name}: tensor {name!r} spans {end - start} bytes, shape {shape} needs "
                               f"{numel * _DTYPE_BYTES[dtype]}")
        spans.append((start, end, name))
    spans.sort()
    for (_, prev_end, prev_name), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise WeightsError(f"{file_name}: tensors {prev_name!r} and {name!r} overlap in the file")


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
