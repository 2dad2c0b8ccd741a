"""GGUF files (llama.cpp's format) -> a ModelConfig, a state dict in Hugging Face names, and a Tokenizer.

Parsing and dequantization are the `gguf` package's: GGUFReader memory-maps the file (through the bounds-checked
reader of tinylm/weights/gguf_reader.py) and `gguf.quants.dequantize` decodes the blocks. This module adds the
metadata -> ModelConfig map, the tensor-name map, the undoing of llama.cpp's q/k row permutation, and checks that turn
every malformed file into a one-line WeightsError.
"""

from __future__ import annotations

import math
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

from tinylm.config import ModelConfig, check_size
from tinylm.errors import ConfigError, WeightsError
from tinylm.model.transformer import CausalLM
from tinylm.weights import gguf_layout as layout
from tinylm.weights.fit import Stored, check_config_fits
from tinylm.weights.gguf_reader import one_line as _one_line
from tinylm.weights.gguf_reader import open_reader as _open
from tinylm.weights.gguf_tokenizer import build_tokenizer

# Tensor types tinylm dequantizes; each is checked bit-exact against gguf.quants in tests/weights/test_gguf_read.py.
SUPPORTED_TYPES = frozenset({QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0,
                             QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K})
_BIG_ARRAY = 64  # metadata arrays longer than this (tokens, merges, scores) are left out of GGUFModel.metadata
# llama.cpp architectures tinylm reads (names, stacked experts, Qwen3-Next's tensors: tinylm/weights/gguf_layout.py)
ARCHITECTURES = tuple(layout.FAMILY_OF_ARCH)
_ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 RoPE factors: read into config.rope_scaling, not a weight


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
        tokenizer = _wrap(self.path, "tokenizer metadata", build_tokenizer, meta)
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:  # ids past the table crash
            raise WeightsError(f"{self.path.name}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                               f"embedding only {self.config.vocab_size} rows")
        return tokenizer


_LAST_OPENED: dict[tuple, GGUFFile] = {}  # (path, size, mtime) -> the file last opened (see open_gguf)


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file and check its metadata and tensor list; no weights are decoded yet. The file opened last is
    kept (a memory map, no copy) and returned again while it is unchanged on disk: a load reads it twice (its
    dequantized tensors, then the blocks of tinylm/weights/gguf_blocks.py), and parsing the metadata of the default
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


def _open_gguf(path: Path) -> GGUFFile:
    reader = _open(path)
    meta = _fields(reader, path)
    config = _wrap(path, "model metadata", _config, reader, meta, path, None)
    arch = meta["general.architecture"]
    weights = [t for t in reader.tensors if t.name != _ROPE_FREQS]
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


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Read a GGUF file: config, dequantized tensors cast to `dtype`, tokenizer and metadata."""
    gguf_file = open_gguf(path)
    config = replace(gguf_file.config, torch_dtype=str(dtype).removeprefix("torch."))
    # Dequantizing takes seconds on a CPU: show it (on stderr, and only where someone is watching).
    progress = tqdm(list(gguf_file.tensors), desc=f"loading {gguf_file.path.name}", unit="tensor", file=sys.stderr,
                    leave=False, disable=not sys.stderr.isatty())
    tensors = {name: gguf_file.read(name).to(dtype) for name in progress}
    return GGUFModel(config=config, tensors=tensors, tokenizer=gguf_file.tokenizer(), metadata=gguf_file.metadata)


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor list only (no weights are decoded)."""
    path = Path(path)
    reader = _open(path)
    return _wrap(path, "model metadata", _config, reader, _fields(reader, path), path, None)


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
    return _wrap(path, "metadata", read)


def _array_len(f) -> int:
    return len(f.data) if f.types and f.types[0] == GGUFValueType.ARRAY else 0


def _check_tensor(tensor, shape: tuple[int, ...], path: Path) -> None:
    """GGUF lists dims innermost first: ne = (in, out); torch's shape is (out, in)."""
    gguf_shape = _torch_shape(tensor)
    if gguf_shape != shape:
        raise WeightsError(f"{path.name}: tensor {tensor.name!r} has shape {gguf_shape}, the config needs {shape}")
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise WeightsError(f"{path.name}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which tinylm "
                           f"does not dequantize (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")


def _read_tensor(tensor, path: Path) -> torch.Tensor:
    """Dequantize one (checked) tensor to float32 in torch layout."""
    shape = _torch_shape(tensor)
    values = _wrap(path, f"tensor {tensor.name!r} ({tensor.tensor_type.name})",
                   lambda: dequantize(tensor.data, tensor.tensor_type))  # a view's data is computed here
    # F32/F16 come back as views of the read-only memory map: copy those so the tensor owns writable memory
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(shape)


def _torch_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dims innermost first: ne = (in, out); torch's shape is (out, in)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


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


def _config(reader: GGUFReader, meta: dict, path: Path, dtype: str | None) -> ModelConfig:
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ConfigError(f"{path.name}: GGUF architecture {arch_name!r} is not supported "
                          f"(tinylm reads {', '.join(ARCHITECTURES)})")
    shapes = {t.name: _torch_shape(t) for t in reader.tensors}
    hp = _Hparams(meta, arch_name, path)
    heads, hidden = hp.size("attention.head_count"), hp.size("embedding_length")
    head_dim = hp.size("attention.key_length", hidden // heads)
    rotary_dim, theta = hp.size("rope.dimension_count", head_dim), float(hp.get("rope.freq_base", 10000.0))
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    eos = [_opt_int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot", "eom")]
    layers = hp.size("block_count")
    family = _family_fields(hp, arch_name, layers, shapes)
    config = ModelConfig(
        model_type=layout.FAMILY_OF_ARCH[arch_name],
        vocab_size=hp.size("vocab_size", shapes.get("token_embd.weight", (0,))[0]),
        hidden_size=hidden, intermediate_size=hp.size("feed_forward_length", 0 if family else None),
        num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=hp.size("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=hp.size("context_length"),
        rms_norm_eps=_decimal(hp.get("attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=theta,
        partial_rotary_factor=rotary_dim / head_dim, rope_scaling=_rope_scaling(hp, freqs, theta, rotary_dim, path),
        **_flags_from_tensors(set(shapes)), **family,
        bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=list(dict.fromkeys(i for i in eos if i is not None)),  # eos, then end-of-turn / end-of-message
        pad_token_id=_opt_int(meta.get("tokenizer.ggml.padding_token_id")), torch_dtype=dtype,
    )
    # Before anything is sized by it (expected_shapes builds every layer and expert): a flipped byte of
    # block_count or expert_count must not size a meta model.
    stored = {name: Stored(*entry) for name, entry in layout.stored_shapes(arch_name, shapes).items()}
    check_config_fits(config, stored, path.name, {f: f"{arch_name}.{k}" for f, k in _SIZE_KEYS.items()})
    return config


def _flags_from_tensors(names: set[str]) -> dict[str, bool]:
    """Features the weights show: biases, q/k norms, a separate output head (principle: detect from tensors)."""
    def has(suffix: str) -> bool:
        return any(n.endswith(suffix) for n in names)
    return {"qkv_bias": has(".attn_q.bias"), "o_bias": has(".attn_output.bias"), "mlp_bias": has(".ffn_up.bias"),
            "qk_norm": has(".attn_q_norm.weight"), "tie_word_embeddings": "output.weight" not in names}


def _family_fields(hp: _Hparams, arch: str, layers: int, shapes: dict) -> dict[str, Any]:
    """The mixture-of-experts and Gated DeltaNet fields of qwen2moe / qwen3moe / qwen3next files ({} otherwise)."""
    if not hp.get("expert_count"):
        return {}
    shared = shapes.get("blk.0.ffn_up_shexp.weight", (0,))[0]  # older qwen2moe files lack the length key
    fields = {"num_experts": hp.size("expert_count"), "num_experts_per_tok": hp.size("expert_used_count"),
              "moe_intermediate_size": hp.size("expert_feed_forward_length"),
              "shared_expert_intermediate_size": hp.size("expert_shared_feed_forward_length", shared),
              # llama.cpp renormalizes the top-k weights for qwen3moe / qwen3next (build_moe_ffn norm_w), not qwen2moe
              "norm_topk_prob": arch != "qwen2moe"}
    if arch == "qwen3next":
        fields.update(_deltanet_fields(hp, layers))
    return fields


def _deltanet_fields(hp: _Hparams, layers: int) -> dict[str, Any]:
    """llama.cpp's ssm.* keys -> the Gated DeltaNet sizes; its layer plan: softmax attention every n-th layer."""
    interval = hp.int("full_attention_interval", 4)
    if not 0 < interval <= layers:
        raise ConfigError(f"{hp.path.name}: GGUF metadata {hp.arch}.full_attention_interval={interval} is not in "
                          f"1..{layers}")
    value_heads, inner = hp.size("ssm.time_step_rank"), hp.int("ssm.inner_size")
    if inner <= 0 or inner % value_heads:
        raise ConfigError(f"{hp.path.name}: GGUF metadata {hp.arch}.ssm.inner_size={inner} is not a multiple of "
                          f"{hp.arch}.ssm.time_step_rank={value_heads}")
    return {"layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
            "linear_conv_kernel_dim": hp.size("ssm.conv_kernel"), "linear_key_head_dim": hp.size("ssm.state_size"),
            "linear_num_key_heads": hp.size("ssm.group_count"), "linear_num_value_heads": value_heads,
            "linear_value_head_dim": inner // value_heads, "attn_output_gate": True, "zero_centered_norm": True}


# ModelConfig field -> the `{arch}.` key it is read from, for messages and bounds.
_SIZE_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
              "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
              "max_position_embeddings": "context_length", "num_experts": "expert_count",
              "num_experts_per_tok": "expert_used_count", "moe_intermediate_size": "expert_feed_forward_length",
              "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
              "linear_conv_kernel_dim": "ssm.conv_kernel", "linear_key_head_dim": "ssm.state_size",
              "linear_num_key_heads": "ssm.group_count", "linear_num_value_heads": "ssm.time_step_rank"}
_FIELDS = {key: field for field, key in _SIZE_KEYS.items()} | {"rope.dimension_count": "head_dim"}


class _Hparams:
    """`{arch}.key` lookups with one-line errors for missing or mistyped values."""

    def __init__(self, meta: dict, arch: str, path: Path):
        self.meta, self.arch, self.path = meta, arch, path

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value (some converters write head counts so)
        if value is None:
            raise ConfigError(f"{self.path.name}: GGUF metadata lacks {self.arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path.name}: GGUF metadata {self.arch}.{key}={value!r} is not an integer")
        return value

    def size(self, key: str, default: int | None = None) -> int:
        """An integer that sizes the model, within ModelConfig's bounds (checked here to name the GGUF key)."""
        value = self.int(key, default)
        try:
            check_size(_FIELDS[key], value, f"{self.arch}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{self.path.name}: GGUF metadata {exc}") from None
        return value


def _rope_scaling(hp: _Hparams, freqs, theta: float, rotary_dim: int, path: Path) -> dict | None:
    """`{arch}.rope.scaling.*` (linear, yarn) or a rope_freqs tensor (llama3) -> HF rope_scaling."""
    if freqs is not None:
        values = _wrap(path, f"tensor {_ROPE_FREQS!r}", dequantize, freqs.data, freqs.tensor_type)
        return _llama3_scaling(np.asarray(values, np.float64).ravel(), theta, rotary_dim, path)
    kind = hp.get("rope.scaling.type", "none")
    factor = hp.get("rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        optional = {"original_max_position_embeddings": "rope.scaling.original_context_length",
                    "attention_factor": "rope.scaling.yarn_attn_factor", "beta_fast": "rope.scaling.yarn_beta_fast",
                    "beta_slow": "rope.scaling.yarn_beta_slow"}
        scaling.update({k: hp.get(key) for k, key in optional.items() if hp.get(key) is not None})
        return scaling
    raise ConfigError(f"{path.name}: GGUF RoPE scaling type {kind!r} is not supported (linear, yarn, llama3)")


def _llama3_scaling(freqs: np.ndarray, theta: float, rotary_dim: int, path: Path) -> dict:
    """Recover Llama-3.1 `rope_scaling` from the per-frequency factors llama.cpp stores instead.

    convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) writes factor 1 for short wavelengths, `factor` for
    long ones and a smooth blend between, with original_max_position_embeddings read as 8192. Every Llama 3.x uses
    low_freq_factor=1, high_freq_factor=4; we check the factors match that rule exactly rather than guess.
    """
    if freqs.shape != ((rotary_dim + 1) // 2,):  # before np.arange below is sized by the metadata's rotary_dim
        raise ConfigError(f"{path.name}: {_ROPE_FREQS} holds {freqs.size} RoPE factors, the rotary dim "
                          f"{rotary_dim} needs {(rotary_dim + 1) // 2}")
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelen, old_ctx = 2 * math.pi / inv_freq, 8192
    smooth = (old_ctx / wavelen - 1.0) / (4.0 - 1.0)
    blend = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    expect = np.where(wavelen < old_ctx / 4.0, 1.0, np.where(wavelen > old_ctx / 1.0, scaling["factor"], blend))
    if freqs.shape != expect.shape or not np.allclose(freqs, expect, rtol=1e-4):
        raise ConfigError(f"{path.name}: {_ROPE_FREQS} holds RoPE factors that do not follow Llama-3 scaling")
    return scaling


# --- helpers


def _wrap(path: Path, what: str, fn, *args):
    """Call into the gguf package or the tokenizer builder; any failure becomes one WeightsError line."""
    try:
        return fn(*args)
    except (WeightsError, ConfigError):
        raise
    except Exception as exc:
        raise WeightsError(f"{path.name}: cannot read {what} ({_one_line(exc)})") from None


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07):
    the value config.json had."""
    return float(str(np.float32(value)))


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
