"""Where a quantized build (tinylm/quant/apply.py) reads its weights from, one tensor at a time: a loaded float
model or a safetensors folder (here), a GGUF file, which can also hand over its Q8_0 / Q4_0 / Q4_1 blocks as they
are (tinylm/weights/gguf_source.py), or a quantized checkpoint, which also hands over each layer's saved tensors
(tinylm/quant/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from safetensors import safe_open

from tinylm.errors import WeightsError
from tinylm.weights import safetensors_io

if TYPE_CHECKING:
    from tinylm.weights.gguf_source import NativeWeight


class Rows:
    """A 2-D float weight read by ranges of rows: the quantizers take it 4096 rows at a time (`weight[a:b]`), so
    a 150k-row embedding is never in memory as a whole float tensor."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[int, int], torch.Tensor]) -> None:
        self.shape, self._read = tuple(shape), read

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(self.shape[0])
        assert step == 1, "rows are read in ranges"
        return self._read(start, stop)


class TensorSource(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """The tensor under a module name, as stored (float; cast by the caller)."""

    def rows(self, name: str) -> Rows | torch.Tensor:
        """A 2-D weight to be quantized, readable by row ranges where the format allows (else the tensor)."""

    def native(self, name: str, scheme: str) -> NativeWeight | None:
        """The stored quantized values of a weight when they are of `scheme`'s kind (int8 / int4), else None."""

    def saved(self, layer: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """A quantized checkpoint's tensors `{layer}.{name}` for those of `names` it holds, by name; None when the
        source stores no such layer (every float source)."""

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

    def rows(self, name: str) -> torch.Tensor:
        return self.get(name)

    def native(self, name: str, scheme: str) -> None:
        return None

    def saved(self, layer: str, names: tuple[str, ...]) -> None:
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
        return self._call(name, lambda handle, stored: handle.get_tensor(stored))

    def rows(self, name: str) -> Rows:
        shape = self._call(name, lambda handle, stored: handle.get_slice(stored).get_shape())
        return Rows(shape, lambda a, b: self._call(name, lambda handle, stored: handle.get_slice(stored)[a:b]))

    def _call(self, name: str, fn):
        path, stored = self.found[name]
        try:
            if path not in self.handles:
                self.handles[path] = safe_open(str(path), framework="pt")
            return fn(self.handles[path], stored)
        except Exception as exc:  # safetensors raises its own error types; name the file instead
            raise WeightsError(f"{path.name}: cannot read safetensors data ({exc})") from None

    def native(self, name: str, scheme: str) -> None:
        return None

    def saved(self, layer: str, names: tuple[str, ...]) -> None:
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
