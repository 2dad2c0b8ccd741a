"""GGUF files (llama.cpp's format) -> a ModelConfig, a state dict in Hugging Face names, and a Tokenizer.

Parsing and dequantization are the `gguf` package's: GGUFReader memory-maps the file (through the bounds-checked
reader of tinylm/weights/gguf_reader.py) and `gguf.quants.dequantize` decodes the blocks. This module adds the
tensor-name map, the undoing of llama.cpp's q/k row permutation, and checks that turn every malformed file into a
one-line WeightsError; the metadata -> ModelConfig map is tinylm/weights/gguf_config.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tqdm import tqdm

from tinylm.config import ModelConfig
from tinylm.errors import WeightsError
from tinylm.model.transformer import CausalLM
from tinylm.weights import gguf_layout as layout
from tinylm.weights.gguf_config import ROPE_FREQS, config_from_metadata
from tinylm.weights.gguf_reader import torch_shape, wrap_errors
from tinylm.weights.gguf_reader import open_reader as _open
from tinylm.weights.gguf_tokenizer import build_tokenizer

# Tensor types tinylm dequantizes; each is checked bit-exact against gguf.quants in tests/weights/test_gguf_read.py.
SUPPORTED_TYPES = frozenset({QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0,
                             QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K})
_BIG_ARRAY = 64  # metadata arrays longer than this (tokens, merges, scores) are left out of GGUFModel.metadata
# llama.cpp architectures tinylm reads (names, stacked experts, Qwen3-Next's tensors: tinylm/weights/gguf_layout.py)


@dataclass
class GGUFModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names; lm_head.weight absent when tied
    tokenizer: Any  # tinylm.tokenizer.Tokenizer, or None for a file without tokenizer.ggml.* metadata
    metadata: dict = field(default_factory=dict)  # plain key/values (no big arrays), for `tinylm info`


@dataclass
class GGUFFile:
    """An open GGUF file whose tensor names, shapes and types are checked, read one tensor at a time (so a
    quantized load never holds a float copy of the whole model)."""

    path: Path
    reader: GGUFReader
    config: ModelConfig
    metadata: dict
    tensors: dict[str, Any]  # HF name -> the reader's tensor (memory-mapped blocks)
    permuted_qk: bool

    def read(self, name: str) -> torch.Tensor:
        """One tensor dequantized to float32 in torch layout, with llama.cpp's q/k row permutation undone."""
        values = _read_tensor(self.tensors[name], self.path)
        return self.unpermute(name, values)

    def unpermute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Undo the q/k row permutation on any tensor whose first dim is the rows of `name` (weights, biases,
        or per-row block scales of a quantized weight)."""
        if not self.permuted_qk or not (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            return rows
        heads = self.config.num_attention_heads if ".q_proj." in name else self.config.num_key_value_heads
        return _unpermute(rows, heads)

    def tokenizer(self) -> Any:
        meta = {**self.metadata, **_fields(self.reader, self.path, long_arrays=True)}
        tokenizer = wrap_errors(self.path, "tokenizer metadata", build_tokenizer, meta)
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:  # ids past the table crash
            raise WeightsError(f"{self.path.name}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                               f"embedding only {self.config.vocab_size} rows")
        return tokenizer


_LAST_OPENED: dict[tuple, GGUFFile] = {}  # (path, size, mtime) -> the file last opened (see open_gguf)


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file and check its metadata and tensor list; no weights are decoded yet. The file opened last is
    kept (a memory map, no copy) and returned again while it is unchanged on disk: a load on blocks opens it twice
    (the blocks of tinylm/weights/gguf_blocks.py, then the other tensors), and parsing the metadata of the default
    model takes ~0.7 s."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _LAST_OPENED:
        return _LAST_OPENED[key]
    opened = _open_gguf(path)
    _LAST_OPENED.clear()
    if key is not None:
        _LAST_OPENED[key] = opened
    return opened


def forget_opened() -> None:
    """Close the file open_gguf kept (once a load is done): its memory map, and the pages of it the load read, go
    with it unless a loaded tensor still shares them."""
    _LAST_OPENED.clear()


def _open_gguf(path: Path) -> GGUFFile:
    reader = _open(path)
    meta = _fields(reader, path)
    config = wrap_errors(path, "model metadata", config_from_metadata, reader, meta, path, None)
    arch = meta["general.architecture"]
    weights = [t for t in reader.tensors if t.name != ROPE_FREQS]
    try:
        tensors = layout.views(arch, config, weights)
    except WeightsError as exc:
        raise WeightsError(f"{path.name}: {exc} with {config.num_hidden_layers} layers") from None
    config, tensors = _zero_output_bias(arch, config, tensors)
    expected = expected_shapes(config)
    for name, tensor in tensors.items():
        if name not in expected:
            raise WeightsError(f"{path.name}: unexpected tensor {tensor.name!r} for a {config.model_type} model "
                               f"with {config.num_hidden_layers} layers")
        _check_tensor(tensor, expected[name], path)
    _check_complete(path, expected, tensors)
    return GGUFFile(path, reader, config, meta, tensors, arch in layout.PERMUTED_QK)


def _zero_output_bias(arch: str, config: ModelConfig, tensors: dict) -> tuple[ModelConfig, dict]:
    """q/k/v biases without an o_proj bias where the family's one `attention_bias` flag covers all four: the
    exporter leaves out an all-zero o_proj bias that llama.cpp's architecture has no tensor for (gguf_layout's
    LACKS_OUTPUT_BIAS); zeros go back so the config stays one transformers can express."""
    if arch not in layout.LACKS_OUTPUT_BIAS or not config.qkv_bias or config.o_bias:
        return config, tensors
    tensors = dict(tensors)
    for name in [n for n in tensors if n.endswith(".self_attn.q_proj.bias")]:
        tensors[name.replace(".q_proj.", ".o_proj.")] = layout.zero_vector(f"{name} (o_proj, zero)",
                                                                         config.hidden_size)
    return replace(config, o_bias=True), tensors


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, skip: frozenset[str] = frozenset()) -> GGUFModel:
    """Read a GGUF file: config, dequantized tensors cast to `dtype` (all but those named in `skip`: the caller reads
    them otherwise, as blocks), tokenizer and metadata."""
    gguf_file = open_gguf(path)
    config = replace(gguf_file.config, torch_dtype=str(dtype).removeprefix("torch."))
    # Dequantizing takes seconds on a CPU: show it (on stderr, and only where someone is watching).
    names = [name for name in gguf_file.tensors if name not in skip]
    progress = tqdm(names, desc=f"loading {gguf_file.path.name}", unit="tensor", file=sys.stderr,
                    leave=False, disable=not sys.stderr.isatty())
    tensors = {name: gguf_file.read(name).to(dtype) for name in progress}
    return GGUFModel(config=config, tensors=tensors, tokenizer=gguf_file.tokenizer(), metadata=gguf_file.metadata)


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor list only (no weights are decoded)."""
    path = Path(path)
    reader = _open(path)
    return wrap_errors(path, "model metadata", config_from_metadata, reader, _fields(reader, path), path, None)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `config` needs, in HF names and torch shapes (out_features, in_features): the state dict of
    the model built on the meta device (no memory), the tied head left out."""
    with torch.device("meta"):
        model = CausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _fields(reader: GGUFReader, path: Path, long_arrays: bool = False) -> dict[str, Any]:
    """Key/values as plain Python values: the short ones (GGUF.* bookkeeping left out), or the long arrays
    (tokens, merges, scores, token types) that only the tokenizer needs."""
    def read() -> dict[str, Any]:
        return {key: f.contents() for key, f in reader.fields.items()
                if not key.startswith("GGUF.") and (_array_len(f) > _BIG_ARRAY) == long_arrays}
    return wrap_errors(path, "metadata", read)


def _array_len(f) -> int:
    return len(f.data) if f.types and f.types[0] == GGUFValueType.ARRAY else 0


def _check_tensor(tensor, shape: tuple[int, ...], path: Path) -> None:
    """GGUF lists dims innermost first: ne = (in, out); torch's shape is (out, in)."""
    gguf_shape = torch_shape(tensor)
    if gguf_shape != shape:
        raise WeightsError(f"{path.name}: tensor {tensor.name!r} has shape {gguf_shape}, the config needs {shape}")
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise WeightsError(f"{path.name}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which tinylm "
                           f"does not dequantize (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")


def _read_tensor(tensor, path: Path) -> torch.Tensor:
    """Dequantize one (checked) tensor to float32 in torch layout."""
    shape = torch_shape(tensor)
    values = wrap_errors(path, f"tensor {tensor.name!r} ({tensor.tensor_type.name})",
                   lambda: dequantize(tensor.data, tensor.tensor_type))  # a view's data is computed here
    # F32/F16 come back as views of the read-only memory map: copy those so the tensor owns writable memory
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(shape)


def _check_complete(path: Path, expected: dict, tensors: dict) -> None:
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{path.name}: missing tensors {', '.join(missing[:3])}{more}")


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo `LlamaModel.permute` on the rows of a q/k tensor, as transformers' LlamaTensorProcessor does.

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2); the inverse swaps back from
    (n_head, rows // n_head // 2, 2, *rest). rows (heads * head_dim, ...) -> same shape.
    """
    return rows.reshape(heads, -1, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


# --- metadata -> ModelConfig
