"""Quantize a model by swapping modules after construction (DESIGN principle 6, as gpt-fast does), tensor by tensor.

`build_quantized` fills a model built on the meta device straight from a TensorSource: each linear layer's float
weight is read, quantized and dropped before the next one is read, so peak memory stays near the quantized size.
`quantize_model` does the same to a model already loaded in float. Module names do not change, so a quantized
model's state dict reads like the float checkpoint (`...q_proj.qweight`, `...q_proj.scales`). The policy names a
scheme per layer; the scheme's class (tinylm/quant/formats.py) builds the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.errors import ConfigError
from tinylm.quant import memory
from tinylm.quant.chunked import chunk_mlps
from tinylm.quant.embedding import TiedHead, as_embedding
from tinylm.quant.formats import FLOAT, LayerSpec, QuantFormat, format_class
from tinylm.quant.policy import QuantPolicy, parse_policy
from tinylm.quant.smooth import calibrate
from tinylm.weights.sources import ModuleSource, TensorSource

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


def build_quantized(model: nn.Module, policy: QuantPolicy, source: TensorSource, dtype: torch.dtype,
                    device: str | torch.device = "cpu", smoothing: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fill `model` (meta or real) from `source` under `policy`; returns it in eval mode. `smoothing`: layer name
    -> input_scale (K,) for int8-activation layers quantized here from float weights (stored int8 layers carry
    their own)."""
    if torch.device(device).type != "cpu":
        raise ConfigError(f"weight-only quantization runs on PyTorch's CPU kernels; device {device!r} is not a CPU")
    schemes = layer_schemes(model, policy)
    validate(model, policy, schemes)
    build = _Builder(policy, source, dtype, policy.kernel_dtype_for(dtype), smoothing or {})
    table = build.table(model, schemes)
    build.head(model, table)  # right after the table: a tied float copy is released as soon as possible
    for name, scheme in schemes.items():
        if name not in (EMBEDDING, HEAD):
            set_module(model, name, build.linear(name, model.get_submodule(name), scheme))
            memory.trim()  # hand the float temporaries back now: the allocator would keep them as resident
    _fill_float(model, source, dtype, device)
    if model.config.tie_word_embeddings and table is None:
        model.tie_weights()  # float embedding: the head shares its weight, as after a plain load
    if policy.mlp_chunk:
        chunk_mlps(model, policy.mlp_chunk)
    return model.eval()


def layer_schemes(model: nn.Module, policy: QuantPolicy) -> dict[str, str]:
    """Module name -> scheme of every layer the policy does not keep in float, in module order: linear layers,
    the embedding table, and an untied head (a tied one is the table)."""
    schemes = {}
    for name, module in model.named_modules():
        if name == EMBEDDING or (isinstance(module, nn.Linear) and name != HEAD):
            scheme = policy.embedding if name == EMBEDDING else policy.scheme_for(name)
        elif name == HEAD and not model.config.tie_word_embeddings:
            scheme = policy.embedding
        else:
            continue
        if scheme != FLOAT:
            schemes[name] = scheme
    return schemes


def validate(model: nn.Module, policy: QuantPolicy, schemes: dict[str, str]) -> None:
    """Every shape problem as one line, before any weight is read."""
    for name, scheme in schemes.items():
        format_class(scheme).check(name, _shape(model.get_submodule(name)), policy)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(N, K) of a linear layer's weight, or (V, C) of an embedding table."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


class _Builder:
    def __init__(self, policy: QuantPolicy, source: TensorSource, dtype: torch.dtype, kernel: torch.dtype,
                 smoothing: dict[str, torch.Tensor]) -> None:
        self.policy, self.source, self.dtype, self.kernel = policy, source, dtype, kernel
        self.smoothing = smoothing

    def table(self, model: nn.Module, schemes: dict[str, str]) -> QuantFormat | None:
        """The quantized embedding (V, C), or None when the policy keeps it in float."""
        if EMBEDDING not in schemes:
            return None
        tied = model.config.tie_word_embeddings  # the table is also the head: smoothed for the head's input
        spec = self._spec(EMBEDDING, _shape(model.get_submodule(EMBEDDING)), schemes[EMBEDDING],
                          HEAD if tied else None)
        table = as_embedding(self._layer(spec, None))
        table.row_chunk = self.policy.head_chunk if tied else 0
        set_module(model, EMBEDDING, table)
        return table

    def head(self, model: nn.Module, table: QuantFormat | None) -> None:
        old = model.lm_head
        bias = self._float(f"{HEAD}.bias") if old.bias is not None else None
        if model.config.tie_word_embeddings:
            if table is not None:
                set_module(model, HEAD, TiedHead(table, bias))
            return
        if self.policy.embedding != FLOAT:
            head = self._layer(self._spec(HEAD, _shape(old), self.policy.embedding), bias)
            head.row_chunk = self.policy.head_chunk
            set_module(model, HEAD, head)

    def linear(self, name: str, module: nn.Linear, scheme: str) -> QuantFormat:
        bias = self._float(f"{name}.bias") if module.bias is not None else None
        return self._layer(self._spec(name, _shape(module), scheme), bias)

    def _spec(self, name: str, shape: tuple[int, int], scheme: str, smoothed_as: str | None = "") -> LayerSpec:
        """`smoothed_as`: the layer whose inputs this one multiplies ("" = itself; None = none: an untied
        embedding, only looked up, keeps float activations and no smoothing)."""
        activations = FLOAT if smoothed_as is None else self.policy.activations
        input_scale = None if smoothed_as is None else self.smoothing.get(smoothed_as or name)
        return LayerSpec(name, shape, scheme, self.dtype, self.kernel, self.policy, activations, input_scale)

    def _layer(self, spec: LayerSpec, bias: torch.Tensor | None) -> QuantFormat:
        """From a quantized checkpoint's saved tensors, else from stored blocks that fit (GGUF Q8_0 / Q4_0 / Q4_1,
        exactly), else quantized from the float weight, read by row ranges as the quantizer goes."""
        cls = format_class(spec.scheme)
        state = self.source.saved(spec.name, cls.state_names)
        if state is not None:
            return cls.from_state(state, bias, spec)
        native = self.source.native(f"{spec.name}.weight", spec.scheme)
        layer = None if native is None else cls.from_native(native, bias, spec)
        return layer if layer is not None else cls.quantize(self.source.rows(f"{spec.name}.weight"), bias, spec)

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
