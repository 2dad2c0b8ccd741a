"""Mutations for tests/weights/test_fuzz.py. Each maker draws one mutant from `rng` and returns (label, mutate), where
mutate(scratch) writes the mutant under the empty folder `scratch` and returns the path to load.

Byte-level mutants (flips, truncations) are biased towards the headers, where a changed byte changes what the
loader believes; field rewrites put boundary values (0, 1, 2**31, 2**64 - 1, the old value +- 1, ...) into the
fields that size things: counts, dims, offsets, lengths, types, and config.json's sizes.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
from pathlib import Path

import gguf

from tests.weights.tiny_files import header, rewrite_header


def boundary_values(rng, old: int, size: int) -> int:
    """An integer of `size` bytes that is likely to break a check: a boundary, a neighbour of `old`, or random."""
    top = (1 << (8 * size)) - 1
    candidates = [0, 1, 2, 3, 4, 7, 8, 31, 32, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                  2**62, 2**63, top, old + 1, old - 1, old * 2, old + 4096, old ^ (1 << rng.randrange(8 * size)),
                  rng.randrange(top + 1)]
    return rng.choice(candidates) & top


# --- safetensors folders


def _tensor_file(folder: Path) -> Path:
    return folder / "model.safetensors"


@functools.lru_cache(maxsize=None)
def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0] + 8


def safetensors_bytes(rng, bases) -> tuple[str, object]:
    base = rng.choice([bases["llama"], bases["qwen3_next"]])
    end = _header_len(_tensor_file(base)) if rng.random() < 0.7 else _tensor_file(base).stat().st_size
    return _byte_mutant(rng, f"{base.name}/model.safetensors", end, lambda scratch: _copy_file(base, scratch))


def _copy_file(base: Path, scratch: Path) -> Path:
    shutil.copytree(base, scratch)
    return _tensor_file(scratch)


def _byte_mutant(rng, name: str, end: int, copy) -> tuple[str, object]:
    """Flip 1-4 bytes in [0, end), or truncate the file at a point in it."""
    if rng.random() < 0.25:
        cut = rng.randrange(end)
        label = f"{name}: truncated at {cut}"

        def edit(data: bytearray) -> bytearray:
            return data[:cut]
    else:
        flips = [(rng.randrange(end), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
        label = f"{name}: bytes {flips} xor-ed"

        def edit(data: bytearray) -> bytearray:
            for offset, mask in flips:
                data[offset] ^= mask
            return data

    def mutate(scratch: Path) -> Path:
        path = copy(scratch)
        path.write_bytes(bytes(edit(bytearray(path.read_bytes()))))
        return path.parent if path.suffix == ".safetensors" else path
    return label, mutate


_SHAPES = [[-1], [0], [1.5], ["64"], [2**63], [2**64], [[1]], {}, None, [], [1] * 40, [2**32, 2**32]]
_DTYPES = ["F16", "BF16", "I8", "F64", "U8", "BOOL", "F33", ["F32"], 3, None, ""]


def safetensors_header(rng, bases) -> tuple[str, object]:
    """Rewrite one field of one tensor's entry (or the header length) to a hostile value."""
    base = rng.choice([bases["llama"], bases["qwen3_next"]])
    entries = sorted(n for n in header(_tensor_file(base)) if n != "__metadata__")
    name, choice = rng.choice(entries), rng.randrange(6)
    if choice == 0:
        value = rng.choice(_SHAPES + [[boundary_values(rng, 64, 8) - rng.choice([0, 2**63])]])
        return f"{base.name}: {name} shape = {value!r:.60}", _entry_edit(base, name, "shape", lambda e: value)
    if choice == 1:
        shift = rng.choice([-8, -4, -1, 1, 4, 8, 2**32, -(2**40)])
        how = rng.choice(["shift", "swap", "end", "zero", "string"])
        return (f"{base.name}: {name} data_offsets {how} {shift}",
                _entry_edit(base, name, "data_offsets", lambda e: _offsets(e["data_offsets"], how, shift)))
    if choice == 2:
        value = rng.choice(_DTYPES)
        return f"{base.name}: {name} dtype = {value!r}", _entry_edit(base, name, "dtype", lambda e: value)
    if choice == 3:
        key = rng.choice(["shape", "dtype", "data_offsets"])
        return f"{base.name}: {name} without {key}", _entry_edit(base, name, key, None)
    if choice == 4:
        return f"{base.name}: {name} removed", _header_edit(base, lambda h: h.pop(name))
    value = boundary_values(rng, _header_len(_tensor_file(base)) - 8, 8)
    return f"{base.name}: header length = {value}", _length_edit(base, value)


def _offsets(offsets: list[int], how: str, shift: int) -> list:
    start, end = offsets
    return {"shift": [start + shift, end + shift], "swap": [end, start], "end": [start, end + shift],
            "zero": [0, end - start], "string": [str(start), str(end)]}[how]


def _entry_edit(base: Path, name: str, key: str, value_of) -> object:
    def edit(h: dict) -> None:
        if value_of is None:
            h[name].pop(key)
        else:
            h[name][key] = value_of(h[name])
    return _header_edit(base, edit)


def _header_edit(base: Path, edit) -> object:
    def mutate(scratch: Path) -> Path:
        shutil.copytree(base, scratch)
        data = header(_tensor_file(scratch))
        edit(data)
        rewrite_header(_tensor_file(scratch), data)
        return scratch
    return mutate


def _length_edit(base: Path, value: int) -> object:
    def mutate(scratch: Path) -> Path:
        shutil.copytree(base, scratch)
        path = _tensor_file(scratch)
        path.write_bytes(struct.pack("<Q", value) + path.read_bytes()[8:])
        return scratch
    return mutate


_CONFIG_KEYS = ["num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
                "partial_rotary_factor", "rms_norm_eps", "eos_token_id", "rope_scaling", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "layer_types",
                "linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim", "linear_conv_kernel_dim",
                "decoder_sparse_step", "mlp_only_layers"]
_CONFIG_VALUES = [0, -1, 1, 2, 3, 7, 2**31, 10**9, 10**18, 1.5, -0.5, "8", None, [], {}, True, [0, 99],
                  {"rope_type": "yarn", "factor": -1}, {"rope_type": "linear", "factor": "2"}, float("nan")]


def config_value(rng, bases) -> tuple[str, object]:
    """Set one config.json key to a hostile value, or to a small change of its own value."""
    base = rng.choice([bases["llama"], bases["qwen3_next"]])
    config = json.loads((base / "config.json").read_text())
    key = rng.choice(_CONFIG_KEYS)
    old = config.get(key)
    near = [old * 2, old + 1, old - 1] if isinstance(old, int) and not isinstance(old, bool) else []
    value = rng.choice(_CONFIG_VALUES + near)

    def edit(scratch: Path) -> None:
        path = scratch / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    def mutate(scratch: Path) -> Path:
        shutil.copytree(base, scratch)
        edit(scratch)
        return scratch
    return f"{base.name}/config.json: {key} = {value!r}", mutate


# --- GGUF


def gguf_bytes(rng, bases) -> tuple[str, object]:
    path = bases["gguf"]
    end = _gguf_layout(path)[0] if rng.random() < 0.7 else path.stat().st_size
    return _byte_mutant(rng, "tiny.gguf", end, lambda scratch: _copy_gguf(path, scratch))


def _copy_gguf(path: Path, scratch: Path) -> Path:
    scratch.mkdir()
    return Path(shutil.copy(path, scratch / "m.gguf"))


def gguf_field(rng, bases) -> tuple[str, object]:
    """Rewrite one integer field of the header (a count, key or string length, value type, array length, tensor
    dim count, dim, type or offset) to a boundary value."""
    path = bases["gguf"]
    _, slots = _gguf_layout(path)
    offset, size, what = rng.choice(slots)
    old = int.from_bytes(path.read_bytes()[offset:offset + size], "little")
    value = boundary_values(rng, old, size)

    def mutate(scratch: Path) -> Path:
        target = _copy_gguf(path, scratch)
        data = bytearray(target.read_bytes())
        data[offset:offset + size] = value.to_bytes(size, "little")
        target.write_bytes(bytes(data))
        return target
    return f"tiny.gguf: {what} (byte {offset}) {old} -> {value}", mutate


@functools.lru_cache(maxsize=None)
def _gguf_layout(path: Path) -> tuple[int, list[tuple[int, int, str]]]:
    """(start of the tensor data, [(offset, size, what)] of every integer field in the header). Offsets come from
    the reader's parts, which are views of the file's memory map."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    slots = []
    fields = [(name, f) for name, f in reader.fields.items()] + [(t.name, t.field) for t in reader.tensors]
    for name, field in fields:
        for part_index, part in enumerate(field.parts[:24]):  # the first items of long arrays are enough
            if part.dtype.kind not in "ui" or part.dtype.itemsize < 4:
                continue  # string bytes and small scalars: the byte mutants cover those
            for item in range(min(len(part), 4)):
                slots.append((part.ctypes.data - base + item * part.dtype.itemsize, part.dtype.itemsize,
                              f"{name} part {part_index}[{item}]"))
    return reader.data_offset, slots

