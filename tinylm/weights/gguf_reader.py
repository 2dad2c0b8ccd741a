"""Reading a GGUF file's header safely and fast: the `gguf` package's GGUFReader with every read bounds-checked,
counts and tensor infos checked before they are looped over or multiplied, tensor spans checked for overlap, and
the metadata arrays (vocabulary, merges, scores) parsed in one pass. Every malformed file becomes one WeightsError
line (`open_reader`); tinylm/weights/gguf.py turns the reader into a model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType

from tinylm.errors import ConfigError, WeightsError

_TYPE_IDS = frozenset(int(t) for t in GGML_QUANT_SIZES)  # every type the gguf package knows the block size of


class _PastEnd(Exception):
    pass


class _Malformed(Exception):
    pass


GGML_MAX_DIMS = 4  # ggml.h: a tensor has at most 4 dims (llama.cpp's gguf.cpp refuses more)
# Fewest bytes one key/value and one tensor info can take (gguf.cpp layout): a count that claims more than the rest of
# the file can hold is refused before the reader loops over it.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dim count, type, offset (an empty name, no dims)
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8}  # an array item: a string's length field, else the scalar itself


class _CheckedReader(GGUFReader):
    """GGUFReader that fails at the first read past the end of the file, and reads its header 5x faster.

    The stock reader slices its memory map, so reading past the end yields a short array: a truncated string comes
    back shorter, and an array whose length field is garbage loops over empty reads. Checking every read's bounds
    turns all of these into one clear error. Its reads also slice the np.memmap itself, whose every slice runs
    memmap's Python-level bookkeeping: the default model's 49152-token vocabulary and its merges (~250 000 reads)
    took 3.5 s of a 4.8 s load. Slicing a plain ndarray view of the same mapped bytes (still no copy) does not.
    """

    _dtypes: dict = {}  # (dtype, byte order) -> the numpy dtype a read is viewed as

    def _get(self, offset, dtype, count=1, override_order=None):
        order = self.byte_order if override_order is None else override_order
        view = self._dtypes.get((dtype, order))
        if view is None:
            view = self._dtypes[dtype, order] = np.dtype(dtype).newbyteorder(order)
        start = int(offset)
        end = start + view.itemsize * int(count)
        if end > self.data.size:  # self.data: the whole file as a uint8 memory map
            raise _PastEnd(f"bytes {start}..{end} are past its end ({self.data.size} bytes)")
        return self._plain_map()[start:end].view(view)

    def _build_fields(self, offs, count):
        _check_count(int(count), "key/value", _MIN_KV_BYTES, self.data.size - offs)
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        _check_count(int(count), "tensor", _MIN_TENSOR_INFO_BYTES, self.data.size - offs)
        return super()._build_tensor_info(offs, count)

    def _push_field(self, field, skip_sum=False):
        if not field.name:  # llama.cpp refuses these too; an empty key names nothing
            raise _Malformed(f"an empty metadata key at byte {field.offset}")
        return super()._push_field(field, skip_sum)

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays: refuse nested ones (no tinylm key holds one, and each level would recurse) and lengths that
        the rest of the file cannot hold, before the reader loops over the claimed length."""
        if raw_type == GGUFValueType.ARRAY:
            header = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]  # item type, length
            item_type, length = int(header[0][0]), int(header[1][0])
            if item_type == GGUFValueType.ARRAY:
                raise _Malformed(f"a nested array at byte {orig_offs}")
            scalar = self.gguf_scalar_to_np.get(item_type)
            item_bytes = np.dtype(scalar).itemsize if scalar is not None else _MIN_ITEM_BYTES.get(item_type, 1)
            if length * item_bytes > self.data.size - orig_offs - 12:
                raise _PastEnd(f"an array at byte {orig_offs} claims {length} items, more than the file holds")
            if item_type == GGUFValueType.STRING:
                return self._string_array_parts(orig_offs, header, length)
            if scalar is not None:
                return self._scalar_array_parts(orig_offs, header, item_type, scalar, length)
        return super()._get_field_parts(orig_offs, raw_type)

    # Arrays as the stock reader lays them out (parts: item type, length, then each item's parts; data: the index of
    # each item's value part) without its recursion and a numpy view per part: ~12 us an item, 1.8 s of a warm start
    # for the default model's 49152-token vocabulary, merges, scores and token types; these take ~0.1 s.
    def _string_array_parts(self, orig_offs: int, header: list, length: int):
        view = memoryview(self._plain_map())
        order = "little" if self.byte_order == "I" else "big"  # "S": swapped (refused after parsing)
        parts: list = list(header)
        values: list[int] = []
        offs, size = orig_offs + 12, self.data.size
        for _ in range(length):
            if offs + 8 > size:
                raise _PastEnd(f"a string at byte {offs} is past its end ({size} bytes)")
            count = int.from_bytes(view[offs:offs + 8], order)
            if count > size - offs - 8:
                raise _PastEnd(f"a string at byte {offs} claims {count} bytes, past its end ({size} bytes)")
            parts += (view[offs:offs + 8], view[offs + 8:offs + 8 + count])  # memoryviews: .tobytes(), .nbytes
            values.append(len(parts) - 1)
            offs += 8 + count
        types = [GGUFValueType.ARRAY] + ([GGUFValueType.STRING] if length else [])
        return offs - orig_offs, parts, values, types

    def _scalar_array_parts(self, orig_offs: int, header: list, item_type: int, scalar, length: int):
        items = self._get(orig_offs + 12, scalar, length)
        parts: list = header + [items[i:i + 1] for i in range(length)]
        types = [GGUFValueType.ARRAY] + ([GGUFValueType(item_type)] if length else [])
        return 12 + int(items.nbytes), parts, list(range(2, 2 + length)), types

    def _plain_map(self) -> np.ndarray:
        """The whole file as a plain uint8 ndarray over the memory map (slicing np.memmap runs Python per slice)."""
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        return plain

    def _get_tensor_info_field(self, orig_offs):
        field = super()._get_tensor_info_field(orig_offs)
        _check_tensor_info(field, self.data.size)
        return field


def _check_count(count: int, what: str, min_bytes: int, left: int) -> None:
    if count * min_bytes > left:
        raise _PastEnd(f"its {what} count {count} is more than the {left} bytes left can hold")


def _check_tensor_info(field, file_size: int) -> None:
    """Dims and type of one tensor info, checked before the reader multiplies the dims (in wrapping uint64) and
    views the data: at most 4 dims, none 0, a known type, and a byte size no larger than the file."""
    _, _, n_dims, dims, raw_type, _ = field.parts
    name, dims, type_id = field.name, [int(d) for d in dims], int(raw_type[0])
    if int(n_dims[0]) > GGML_MAX_DIMS:
        raise _Malformed(f"tensor {name!r} has {int(n_dims[0])} dims, at most {GGML_MAX_DIMS} are allowed")
    if 0 in dims:
        raise _Malformed(f"tensor {name!r} has dims {dims}: a dim of 0")
    if type_id not in _TYPE_IDS:
        raise _Malformed(f"tensor {name!r} has unknown type id {type_id}")
    block, block_bytes = GGML_QUANT_SIZES[QType(type_id)]
    if dims and dims[0] % block:
        raise _Malformed(f"tensor {name!r} has {dims[0]} values per row, not a multiple of its {block}-value blocks")
    if math.prod(dims) // block * block_bytes > file_size:
        raise _PastEnd(f"tensor {name!r} of dims {dims} needs more bytes than the file has")


def _check_tensor_spans(reader: GGUFReader) -> None:
    """Tensor data must lie in the data section, aligned, each tensor's bytes its own: an overlap would let one
    tensor read (or decode as another type) another's bytes."""
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    position, previous = reader.data_offset, None
    for start, end, name in spans:
        if start % reader.alignment:
            raise _Malformed(f"tensor {name!r} starts at byte {start}, not a multiple of the alignment "
                             f"{reader.alignment}")
        if start < position:
            raise _Malformed(f"tensors {previous!r} and {name!r} overlap in the file")
        if end > reader.data.size:
            raise _PastEnd(f"tensor {name!r} ends at byte {end}, past the end ({reader.data.size} bytes)")
        position, previous = end, name


def open_reader(path: Path) -> GGUFReader:
    """The checked reader of the GGUF file at `path`, or one WeightsError line naming what is wrong."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"GGUF":
        if b"GGUF".startswith(head):
            raise WeightsError(f"{path.name}: truncated GGUF file ({len(head)} bytes)")
        raise WeightsError(f"{path.name}: not a GGUF file (starts with {head!r}, not b'GGUF')")
    try:
        reader = _CheckedReader(path)
        _check_tensor_spans(reader)
    except _PastEnd as exc:
        raise WeightsError(f"{path.name}: truncated or corrupt GGUF file: {exc}") from None
    except _Malformed as exc:
        raise WeightsError(f"{path.name}: corrupt GGUF file: {exc}") from None
    except Exception as exc:  # the gguf package raises ValueError, KeyError, IndexError, UnicodeDecodeError, ...
        raise WeightsError(f"{path.name}: corrupt GGUF header ({one_line(exc)})") from None
    if reader.byte_order != "I":
        raise WeightsError(f"{path.name}: big-endian GGUF files are not supported")
    return reader


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def wrap_errors(path: Path, what: str, fn, *args):
    """Call into the gguf package or the tokenizer builder; any failure becomes one WeightsError line."""
    try:
        return fn(*args)
    except (WeightsError, ConfigError):
        raise
    except Exception as exc:
        raise WeightsError(f"{path.name}: cannot read {what} ({one_line(exc)})") from None


def torch_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dims innermost first: ne = (in, out); torch's shape is (out, in)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def f16_values(pairs: np.ndarray) -> torch.Tensor:
    """(N, G, 2) bytes holding little-endian f16 values -> (N, G) float32."""
    return torch.from_numpy(np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32))
