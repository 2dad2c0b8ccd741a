"""Where a quantized build reads its weights from, one tensor at a time: a loaded float model, a safetensors
folder, or a GGUF file (which can also hand over its Q8_0 / Q4_0 / Q4_1 blocks as they are)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import safe_open

from tinylm.errors import WeightsError
from tinylm.quant.gguf_blocks import NativeWeight, decode
from tinylm.weights import safetensors_io


class TensorSource(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """The tensor under a module name, as stored (float; cast by the caller)."""

    def native(self, name: str) -> NativeWeight | None:
        """The stored quantized blocks of a weight when a quantized layer can take them as they are."""

    def close(self) -> None: ...


class ModuleSource:
    """An already-loaded float model: its own parameters and buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(model.named_buffers(remove_duplicate=False))

    def get(self, name: str) -> torch.Tensor:
        """Handed over once: the source drops its reference, so each float weight is freed once quantized."""
        value = self.tensors.pop(name)
        for alias in [k for k, t in self.tensors.items() if t is value]:  # a tied head's name for the same tensor
            del self.tensors[alias]
        return value.detach()

    def native(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.tensors.clear()


class SafetensorsSource:
    """A Hugging Face folder: headers validated and names/shapes checked up front, tensors read on demand."""

    def __init__(self, folder: Path, expected: dict[str, tuple[int, ...]], optional: set[str],
                 rename: Callable[[str], str | None], extra: Callable[[str], bool] = lambda name: False) -> None:
        """`extra(name)`: tensors the caller checks itself (a quantized checkpoint's integer parts)."""
        safetensors_io.verify_manifest(folder)
        self.found = {}  # module name -> (file, stored name)
        for path in safetensors_io.checkpoint_files(folder):
            for stored, entry in safetensors_io.read_header(path).items():
                name = rename(stored)
                if name is None:
                    continue
                if not extra(name):
                    _check_entry(folder, path, stored, name, entry, expected)
                self.found[name] = (path, stored)
        missing = sorted(set(expected) - set(self.found) - set(optional))
        if missing:
            raise WeightsError(f"{folder}: missing tensors {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        self.handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        path, stored = self.found[name]
        try:
            if path not in self.handles:
                self.handles[path] = safe_open(str(path), framework="pt")
            return self.handles[path].get_tensor(stored)
        except Exception as exc:  # safetensors raises its own error types; name the file instead
            raise WeightsError(f"{path.name}: cannot read safetensors data ({exc})") from None

    def native(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.handles.clear()


def _check_entry(folder: Path, path: Path, stored: str, name: str, entry: dict, expected: dict) -> None:
    if name not in expected:
        raise WeightsError(f"{folder}: unexpected tensor {stored!r} (wrong config or architecture?)")
    if tuple(entry["shape"]) != tuple(expected[name]):
        raise WeightsError(f"{path.name}: tensor {stored!r} has shape {tuple(entry['shape'])}, the config needs "
                           f"{tuple(expected[name])}")
    if entry["dtype"] not in safetensors_io.FLOAT_DTYPES:
        raise WeightsError(f"{path.name}: tensor {stored!r} has dtype {entry['dtype']}, expected one of "
                           f"{', '.join(safetensors_io.FLOAT_DTYPES)}")


class GGUFSource:
    """A GGUF file: float tensors dequantized one at a time; Q8_0 / Q4_0 / Q4_1 weights also as their blocks."""

    def __init__(self, gguf_file) -> None:  # tinylm.weights.gguf.GGUFFile
        self.file = gguf_file

    def get(self, name: str) -> torch.Tensor:
        return self.file.read(name)

    def native(self, name: str) -> NativeWeight | None:
        tensor = self.file.tensors.get(name)
        if tensor is None or tensor.data.ndim != 2:
            return None
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = decode(tensor.tensor_type, tensor.data, shape)
        return None if weight is None else weight.rows(lambda rows: self.file.unpermute(name, rows))

    def close(self) -> None:
        pass
