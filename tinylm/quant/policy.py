"""Mixed-precision policies (as the Nano compact 3B model, NanoLLM-Qwen2.5-3B, uses): a default scheme for linear
layers, one for the embedding and output head, per-module overrides by name pattern, and the options that shape the
quantized model.

A policy is named on the command line and in `tinylm.load(quantize=...)` as `NAME[:key=value,...]`, for example
`int4`, `qkv-fp16:group_size=128`, `int8:head_chunk=8192`. Schemes: `float` (kept in the model dtype), and each
format's name in tinylm/quant/formats.py: `fp16` / `bf16` (stored in 16 bits whatever the model dtype), `int8` (per
output channel, or by groups of `int8_group_size`), `int4` (by groups of `group_size`). Option `activations=int8`
also quantizes the inputs of int8 layers per token (W8A8 dynamic). A policy only names schemes; the classes they
name do the work.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace

import torch

from tinylm.errors import ConfigError
from tinylm.model.moe import routes_tokens
from tinylm.quant.formats import FLOAT, FORMATS, format_class
from tinylm.quant.int4pack import GROUP_SIZES

DEFAULT_GROUP_SIZE = 64  # divides every in_features of SmolLM2 (576, 1536) and Qwen2.5-3B (2048, 11008)
ACTIVATIONS = ("float", "int8")
KERNEL_DTYPES = {"auto": None, "model": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
_QKV = ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj")


@dataclass(frozen=True)
class QuantPolicy:
    name: str
    default: str  # scheme of linear layers no override matches
    embedding: str  # scheme of the embedding table, which is also the tied head (or of an untied lm_head)
    overrides: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern on the module name, scheme); first match wins
    group_size: int | None = None  # int4 groups; None: stored 4-bit blocks (GGUF: 32) kept as they are, else 64
    int8_group_size: int | None = None  # None: one scale per output channel (fused kernel); 32 keeps Q8_0 exact
    head_chunk: int = 0  # > 0: the output head computes this many vocab rows at a time
    mlp_chunk: int = 0  # > 0: each MLP runs by chunks of this many intermediate features
    kernel_dtype: str = "auto"  # auto: bfloat16 (the CPU kernels' fast path); model: the model's own dtype
    activations: str = "float"  # int8: int8 layers quantize their inputs per token too (W8A8, int8 matmul kernels)
    description: str = field(default="", compare=False)
    # The options a `NAME:key=value` spec gave explicitly (parse_policy); None for a policy built in code. A saved
    # quantized folder takes only these from `quantize` (tinylm/quant/checkpoint.py).
    explicit: frozenset[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for scheme in (self.default, self.embedding, *(s for _, s in self.overrides)):
            if scheme != FLOAT and scheme not in FORMATS:
                raise ConfigError(f"policy {self.name!r}: unknown scheme {scheme!r} "
                                  f"(schemes: {', '.join([FLOAT, *FORMATS])})")
        if self.embedding != FLOAT and not hasattr(format_class(self.embedding), "lookup"):
            tables = [s for s, cls in FORMATS.items() if hasattr(cls, "lookup")]  # formats that can be looked up
            raise ConfigError(f"policy {self.name!r}: the embedding is {FLOAT} or {' or '.join(tables)}, "
                              f"not {self.embedding}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"policy {self.name!r}: group_size must be one of "
                              f"{', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.int8_group_size is not None and self.int8_group_size <= 0:
            raise ConfigError(f"policy {self.name!r}: int8_group_size must be positive, got {self.int8_group_size}")
        if self.head_chunk < 0 or self.head_chunk % 64:
            raise ConfigError(f"policy {self.name!r}: head_chunk must be a multiple of 64, got {self.head_chunk}")
        if self.mlp_chunk < 0 or self.mlp_chunk % 64:
            raise ConfigError(f"policy {self.name!r}: mlp_chunk must be a multiple of 64, got {self.mlp_chunk}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"policy {self.name!r}: activations must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {self.activations!r}")
        if self.activations == "int8" and self.int8_group_size is not None:
            raise ConfigError(f"policy {self.name!r}: activations=int8 needs per-channel int8 weights "
                              "(no int8_group_size)")
        if self.kernel_dtype not in KERNEL_DTYPES:
            raise ConfigError(f"policy {self.name!r}: kernel_dtype must be one of {', '.join(KERNEL_DTYPES)}, "
                              f"got {self.kernel_dtype!r}")

    def scheme_for(self, module_name: str) -> str:
        """The scheme of a linear layer (not the embedding or the head)."""
        if routes_tokens(module_name):  # always left in floating point: tiny, and they decide routing
            return "float"
        for pattern, scheme in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return scheme
        return self.default

    def int4_group(self) -> int:
        """The group size of int4 layers quantized here from float weights."""
        return self.group_size or DEFAULT_GROUP_SIZE

    def kernel_dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        return KERNEL_DTYPES[self.kernel_dtype] or (model_dtype if self.kernel_dtype == "model" else torch.bfloat16)

    @property
    def spec(self) -> str:
        """The `NAME:key=value,...` string that gives back this policy from a built-in one."""
        base = BUILTIN.get(self.name)
        changed = {k: v for k, v in _options(self).items() if base is None or getattr(base, k) != v}
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["overrides"] = [list(o) for o in self.overrides]
        data.pop("description")
        data.pop("explicit")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QuantPolicy:
        try:
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "explicit"}
            known["overrides"] = tuple(tuple(o) for o in known.get("overrides", ()))
            return cls(**known)
        except TypeError as exc:
            raise ConfigError(f"quantization_config is not a tinylm policy ({exc})") from None


def _options(policy: QuantPolicy) -> dict:
    return {k: getattr(policy, k) for k in _OPTION_TYPES}


_OPTION_TYPES = {"group_size": int, "int8_group_size": int, "head_chunk": int, "mlp_chunk": int, "kernel_dtype": str,
                 "activations": str}

BUILTIN = {p.name: p for p in (
    QuantPolicy("int8", "int8", "int8", description="every linear layer and the embedding/head in int8 per channel: "
                "the true 8-bit baseline"),
    QuantPolicy("w8a8", "int8", "int8", activations="int8", description="int8 per channel as `int8`, and every "
                "layer's input quantized to int8 per token: batched decode and prefill on int8 matmul kernels"),
    QuantPolicy("int4", "int4", "int8", description="linear layers int4 by groups; embedding/head int8"),
    # Groups of 32 (GGUF's Q4 block size): with 64 the 4-bit head of SmolLM2-135M-Instruct missed the quality gate
    # (top-1 0.850, KL 0.084); with 32, 0.855 and 0.060 (benchmarks/quant_quality.py, bf16, stop 26).
    QuantPolicy("int4-tiedq", "int4", "int4", group_size=32, description="fully 4-bit by groups of 32, including "
                "the embedding that is also the tied head"),
    QuantPolicy("qkv-fp16", "int4", "int8", overrides=tuple((p, "fp16") for p in _QKV),
                description="q/k/v in float16, the rest int4, one int8 embedding/head: the policy of the Nano "
                "compact 3B model (NanoLLM-Qwen2.5-3B)"),
)}
ALIASES = {"qkvfp16": "qkv-fp16", "tiedq": "int4-tiedq"}


def parse_policy(spec: str | QuantPolicy) -> QuantPolicy:
    """`NAME[:key=value,...]` -> QuantPolicy, with one-line errors for unknown names, keys and values."""
    if isinstance(spec, QuantPolicy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"quantize must be a policy name such as int8 or int4, got {spec!r}")
    name, options = split_spec(spec)
    return replace(BUILTIN[name], **options, explicit=frozenset(options))


def split_spec(spec: str) -> tuple[str, dict]:
    """`NAME[:key=value,...]` -> (built-in name, the options given explicitly)."""
    name, _, options = spec.strip().partition(":")
    name = ALIASES.get(name, name)
    if name not in BUILTIN:
        raise ConfigError(f"unknown quantization policy {name!r} (known: {', '.join(BUILTIN)})")
    return name, _parse_options(spec, options)


def _parse_options(spec: str, options: str) -> dict:
    parsed = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in _OPTION_TYPES:
            raise ConfigError(f"quantization policy {spec!r}: bad option {item!r} "
                              f"(options: {', '.join(f'{k}=...' for k in _OPTION_TYPES)})")
        try:
            parsed[key] = _OPTION_TYPES[key](value.strip())
        except ValueError:
            raise ConfigError(f"quantization policy {spec!r}: {key} must be an integer, got {value.strip()!r}") from None
    return parsed
