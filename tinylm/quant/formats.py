"""What a quantized layer class provides, and the registry of such classes by scheme name.

A format is one nn.Module class that owns everything about how its layer is stored: how it is made from a float
weight, how it takes stored blocks as they are (GGUF), how it splits into row or column pieces and joins the rows
of several layers into one (chunked MLPs; fused q/k/v and gate/up), which tensors it saves and how it is rebuilt
from them. Policies name formats by scheme (`int8`, `int4`, `fp16`, ...); `FORMATS` maps each scheme to its class.
Adding a format is one class and one `@register("name")`: the policy, builder, fusion and checkpoints find it
there (tests/quant/test_toy_format.py adds one inside a test). The built-in formats are imported by
tinylm/quant/linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinylm.errors import ConfigError, WeightsError

Bounds = list[tuple[int, int]]  # [(a, b), ...]: row (or column) ranges [a, b)


@dataclass(frozen=True)
class LayerSpec:
    """What a format needs to build one layer, besides its tensors."""

    name: str  # module name (`model.layers.0.mlp.up_proj`), for messages
    shape: tuple[int, int]  # (N, K) of the float weight: out_features, in_features
    scheme: str  # the policy's name of the format (fp16 and bf16 share one class)
    dtype: torch.dtype  # the model's dtype: outputs are cast to it
    kernel_dtype: torch.dtype  # the dtype the kernels compute in
    policy: Any  # the QuantPolicy: group sizes and the other options a format reads
    activations: str = "float"  # "int8": inputs quantized per token too (W8A8); an untied embedding keeps "float"
    input_scale: torch.Tensor | None = None  # (K,) SmoothQuant factor measured for this layer's inputs, or None


class QuantFormat(nn.Module):
    """The base of every format class: the protocol, and the state dict built from `state()`.

    A format layer has `in_features`, `out_features`, `bias` ((N,) or None), `forward(x (..., K)) -> (..., N)` and:
      check(name, shape, policy)            classmethod: ConfigError if the shape cannot be stored so (no weight read)
      quantize(weight, bias, spec)          classmethod: from the float (N, K) weight, a tensor or a `Rows` reader
      from_native(native, bias, spec)       classmethod: from a GGUF file's blocks as they are, or None if they do not
                                            fit (tinylm.weights.gguf_blocks.NativeWeight)
      state()                               the tensors a checkpoint stores instead of `weight` (the bias is `bias`)
      from_state(state, bias, spec)         classmethod: rebuilt from those tensors, each checked (WeightsError)
      split_rows(bounds), split_cols(bounds) pieces computing output rows [a, b), or taking input features [a, b)
                                            (their outputs sum to the whole; the bias goes to the first)
      concat_rows(layers)                   classmethod: one layer computing the layers' outputs concatenated;
                                            ConfigError when they differ in options
      dequantize()                          the float32 (N, K) matrix the layer stands for
    `state_names` lists the names `state()` may hold; a checkpoint loader reads those.
    """

    state_names: tuple[str, ...] = ()

    @classmethod
    def check(cls, name: str, shape: tuple[int, int], policy) -> None:
        """Nothing to check by default: every shape can be stored."""

    @classmethod
    def quantize(cls, weight, bias: torch.Tensor | None, spec: LayerSpec) -> QuantFormat:
        raise NotImplementedError

    @classmethod
    def from_native(cls, native, bias: torch.Tensor | None, spec: LayerSpec) -> QuantFormat | None:
        return None  # GGUF blocks are dequantized and quantized again

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bias: torch.Tensor | None, spec: LayerSpec) -> QuantFormat:
        raise NotImplementedError

    def split_rows(self, bounds: Bounds) -> list[QuantFormat]:
        raise NotImplementedError

    def split_cols(self, bounds: Bounds) -> list[QuantFormat]:
        raise NotImplementedError

    @classmethod
    def concat_rows(cls, layers: list[QuantFormat]) -> QuantFormat:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    # The state dict is `state()` plus the bias, so checkpoints hold what the format chooses (int4: the portable
    # byte order, not this CPU's kernel layout) and `save_quantized` needs no case per format.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for key, value in self.state().items():
            destination[prefix + key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


FORMATS: dict[str, type[QuantFormat]] = {}  # scheme -> class; filled by @register (built-ins: tinylm/quant/linear.py)
FLOAT = "float"  # the scheme of layers kept as they are, in the model dtype: no format class


def register(*schemes: str):
    """Class decorator: the class is the format of each of `schemes` in policies and checkpoints."""
    def add(cls: type[QuantFormat]) -> type[QuantFormat]:
        for scheme in schemes:
            if scheme == FLOAT or FORMATS.get(scheme, cls) is not cls:
                raise ValueError(f"quantization scheme {scheme!r} is taken")
            FORMATS[scheme] = cls
        return cls
    return add


def format_class(scheme: str) -> type[QuantFormat]:
    if scheme not in FORMATS:
        raise ConfigError(f"unknown quantization scheme {scheme!r} (schemes: {', '.join([FLOAT, *FORMATS])})")
    return FORMATS[scheme]


# --- helpers for from_state: every stored tensor checked, each failure one WeightsError naming the tensor


def required(state: dict[str, torch.Tensor], layer: str, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in state]
    if missing:
        raise WeightsError(f"quantized checkpoint: missing tensor {layer}.{missing[0]}")
    return [state[n] for n in names]


def expect(layer: str, part: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    """`tensor` must have `shape` (and `dtype`, when given)."""
    if tuple(tensor.shape) != tuple(shape):
        raise WeightsError(f"{layer}.{part} has shape {tuple(tensor.shape)}, the config needs {tuple(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise WeightsError(f"{layer}.{part} has dtype {tensor.dtype}, expected {dtype}")


def check_scales(layer: str, scales: torch.Tensor, rows: int, cols: int, group_sizes=None) -> None:
    """scales (N,) per channel or (N, G) per group of K / G features; `group_sizes`: the ones allowed (and a 2-D
    tensor required), or None for any."""
    groups = scales.shape[1] if scales.dim() == 2 else 1
    bad = scales.dim() not in (1, 2) or scales.shape[0] != rows or cols % groups or not scales.is_floating_point()
    if bad or (group_sizes is not None and (scales.dim() != 2 or cols // groups not in group_sizes)):
        raise WeightsError(f"{layer}.scales has shape {tuple(scales.shape)} and dtype {scales.dtype}, which do not "
                           f"fit a ({rows}, {cols}) weight")


def same_options(layers: list[nn.Module], *attributes: str) -> None:
    """concat_rows' check: one class, and the same value of each attribute (group size, storage dtype, ...)."""
    first = layers[0]
    if any(type(m) is not type(first) or any(getattr(m, a) != getattr(first, a) for a in attributes)
           for m in layers):
        raise ConfigError(f"concat_rows: the layers differ in scheme or in {', '.join(attributes) or 'options'}")
