"""Quantize a model by swapping modules after construction (DESIGN principle 6, as gpt-fast does), tensor by tensor.

`build_quantized` fills a model built on the meta device straight from a TensorSource: each linear layer's float
weight is read, quantized and dropped before the next one is read, so peak memory stays near the quantized size.
`quantize_model` does the same to a model already loaded in float. Module names do not change, so a quantized
model's state dict reads like the float checkpoint (`...q_proj.qweight`, `...q_proj.scales`).
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.errors import ConfigError
from tinylm.quant import int4pack, memory
from tinylm.quant.chunked import chunk_mlps
from tinylm.quant.embedding import TiedHead, as_embedding
from tinylm.quant.linear import HalfLinear, Int4Linear, Int8Linear, QuantLinearBase
from tinylm.quant.policy import HALF, QuantPolicy, parse_policy
from tinylm.quant.smooth import calibrate
from tinylm.quant.sources import ModuleSource, TensorSource

EMBEDDING, HEAD = "model.embed_tokens", "lm_head"


def quantize_model(model: nn.Module, policy: str | QuantPolicy, calibration_ids: list[int] | None = None
                   ) -> nn.Module:
    """Quantize a loaded float model in place (its float weights are released layer by layer). A policy with
    int8 activations is smoothed first (tinylm/quant/smooth.py), calibrated on `calibration_ids`."""
    dtype = model.model.norm.weight.dtype
    policy = parse_policy(policy)
    smoothing = None
    if policy.activations == "int8":
        if not calibration_ids:
            raise ConfigError(f"policy {policy.name!r} quantizes activations: it needs calibration tokens "
                              "(the model's tokenizer) to measure their ranges")
        smoothing = calibrate(model, calibration_ids)
    source = ModuleSource(model)
    try:
        return build_quantized(model, policy, source, dtype, model.model.norm.weight.device, smoothing)
    finally:
        source.close()


def build_quantized(model: nn.Module, policy: str | QuantPolicy, source: TensorSource, dtype: torch.dtype,
                    device: str | torch.device = "cpu", smoothing: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fill `model` (meta or real) from `source` under `policy`; returns it in eval mode. `smoothing`: layer name
    -> input_scale (K,) for int8-activation layers quantized here from float weights (stored int8 layers carry
    their own)."""
    policy = parse_policy(policy)
    if torch.device(device).type != "cpu":
        raise ConfigError(f"weight-only quantization runs on PyTorch's CPU kernels; device {device!r} is not a CPU")
    validate(model, policy)
    build = _Builder(policy, source, dtype, policy.kernel_dtype_for(dtype), smoothing or {})
    table = build.table(model)
    build.head(model, table)  # right after the table: a tied float copy is released as soon as possible
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != HEAD and policy.scheme_for(name) != "float":
            set_module(model, name, build.linear(name, module, policy.scheme_for(name)))
            memory.trim()  # hand the float temporaries back now: the allocator would keep them as resident
    _fill_float(model, source, dtype, device)
    if model.config.tie_word_embeddings and table is None:
        model.tie_weights()  # float embedding: the head shares its weight, as after a plain load
    if policy.mlp_chunk:
        chunk_mlps(model, policy.mlp_chunk)
    return model.eval()


def validate(model: nn.Module, policy: QuantPolicy) -> None:
    """Every shape problem as one line, before any weight is read."""
    for name, module in model.named_modules():
        scheme = _scheme(model, policy, name) if isinstance(module, (nn.Linear, nn.Embedding)) else "float"
        if scheme == "float":
            continue
        rows, cols = (module.num_embeddings, module.embedding_dim) if isinstance(module, nn.Embedding) else (
            module.out_features, module.in_features)
        if scheme == "int4":
            int4pack.check_shape(name, rows, cols, policy.int4_group())
        elif scheme == "int8" and policy.int8_group_size and cols % policy.int8_group_size:
            raise ConfigError(f"int8 group size {policy.int8_group_size} does not divide in_features {cols} of {name}")


def _scheme(model: nn.Module, policy: QuantPolicy, name: str) -> str:
    if name == EMBEDDING or (name == HEAD and not model.config.tie_word_embeddings):
        return policy.embedding
    if name == HEAD:
        return "float"  # tied: follows the embedding
    return policy.scheme_for(name)


class _Builder:
    def __init__(self, policy: QuantPolicy, source: TensorSource, dtype: torch.dtype, kernel: torch.dtype,
                 smoothing: dict[str, torch.Tensor]) -> None:
        self.policy, self.source, self.dtype, self.kernel = policy, source, dtype, kernel
        self.smoothing = smoothing

    def table(self, model: nn.Module) -> QuantLinearBase | None:
        """The quantized embedding (V, C), or None when the policy keeps it in float."""
        if self.policy.embedding == "float":
            return None
        tied = model.config.tie_word_embeddings  # the table is also the head: smoothed for the head's input
        table = as_embedding(self._quantize(EMBEDDING, self.policy.embedding, None, HEAD if tied else None))
        table.row_chunk = self.policy.head_chunk if tied else 0
        set_module(model, EMBEDDING, table)
        return table

    def head(self, model: nn.Module, table: QuantLinearBase | None) -> None:
        old = model.lm_head
        bias = self._float(f"{HEAD}.bias") if old.bias is not None else None
        if model.config.tie_word_embeddings:
            if table is not None:
                set_module(model, HEAD, TiedHead(table, bias))
            return
        if self.policy.embedding != "float":
            head = self._quantize(HEAD, self.policy.embedding, bias)
            head.row_chunk = self.policy.head_chunk
            set_module(model, HEAD, head)

    def linear(self, name: str, module: nn.Linear, scheme: str) -> QuantLinearBase:
        bias = self._float(f"{name}.bias") if module.bias is not None else None
        return self._quantize(name, scheme, bias)

    def _quantize(self, name: str, scheme: str, bias: torch.Tensor | None, smoothed_as: str | None = "") -> nn.Module:
        """`smoothed_as`: the layer whose inputs this one multiplies ("" = itself; None = none: an untied
        embedding, only looked up, keeps weight-only int8)."""
        if scheme in HALF:
            return HalfLinear(self.source.get(f"{name}.weight"), bias, HALF[scheme])
        dtypes = {"dtype": self.dtype, "kernel_dtype": self.kernel}
        activations = "float" if smoothed_as is None else self.policy.activations
        native = self.source.native(f"{name}.weight", scheme)
        if native is not None and self.policy.takes_as_is(native.kind, scheme, native.group_size):
            if native.kind == "int8":  # GGUF Q8_0 blocks or a checkpoint's int8, exactly
                return Int8Linear(native.q, native.scales, bias, **dtypes, activations=activations,
                                  input_scale=native.input_scale)
            return Int4Linear(native.q, native.scales, native.zeros, bias, **dtypes)  # GGUF Q4_0/Q4_1, exactly
        if scheme == "int8":
            smoothing = None if smoothed_as is None else self.smoothing.get(smoothed_as or name)
            return Int8Linear.from_float(self._weight(name), bias, group_size=self.policy.int8_group_size, **dtypes,
                                         activations=activations, input_scale=smoothing)
        return Int4Linear.from_float(self._weight(name), bias, group_size=self.policy.int4_group(), **dtypes)

    def _weight(self, name: str):
        """The float values, read by row ranges as the quantizer goes (GGUF blocks that do not fit the scheme are
        dequantized and quantized again)."""
        return self.source.rows(f"{name}.weight")

    def _float(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(self.dtype)


def _fill_float(model: nn.Module, source: TensorSource, dtype: torch.dtype, device) -> None:
    """Every parameter or buffer still on the meta device (norms, float linears) gets its stored values."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_meta:
            continue
        value = source.get(name)
        value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(tensor, nn.Parameter):
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        else:
            module._buffers[attr] = value


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
