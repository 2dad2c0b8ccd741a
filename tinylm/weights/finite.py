"""NaN / Inf in weights, found at load and named: a checkpoint holding them otherwise loads, and every logit turns
NaN, so generation ends at once with empty text and exit status 0.

The check reads each float tensor in chunks (`torch.isfinite` of a slice), so it needs a few MB whatever the model
size, and costs one pass over the weights (about 0.1 s per 100M parameters on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.errors import WeightsError
from tinylm.weights.sources import Rows

SKIP_HINT = "pass check_finite=False to skip this check"


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise WeightsError naming `name` if the float `tensor` holds a NaN or an Inf (integer tensors pass)."""
    if not tensor.is_floating_point() or tensor.is_meta:
        return
    if tensor.numel() == 0:
        return
    # One reduction pass and no temporary (isfinite().all() wrote a bool per element: 8x slower, ~6 s of a loaded
    # host's start-up): a NaN anywhere makes min and max NaN, an Inf or -Inf is the max or the min.
    low, high = torch.aminmax(tensor.detach())
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise WeightsError(f"{name} holds NaN or Inf values (corrupt checkpoint?); {SKIP_HINT}")


def check_model_finite(model: nn.Module) -> None:
    """Every float parameter and buffer of a loaded model (a quantized model's scales included)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(name, tensor)


class FiniteSource:
    """A TensorSource (tinylm/weights/sources.py) whose values are checked as they are read, before anything quantizes
    them: quantizing a NaN gives NaN or meaningless scales, and the tensor's name would be lost."""

    def __init__(self, source) -> None:
        self.source = source

    def get(self, name: str) -> torch.Tensor:
        value = self.source.get(name)
        check_finite(name, value)
        return value

    def rows(self, name: str):
        rows = self.source.rows(name)
        if isinstance(rows, torch.Tensor):
            check_finite(name, rows)
            return rows
        return Rows(rows.shape, lambda start, stop: _checked(name, rows[start:stop]))

    def native(self, name: str, scheme: str):
        """Stored quantized blocks: their integers cannot be NaN, their float scales can."""
        weight = self.source.native(name, scheme)
        if weight is not None:
            for part in ("scales", "zeros"):
                if getattr(weight, part) is not None:
                    check_finite(f"{name} ({part})", getattr(weight, part))
        return weight

    def saved(self, layer: str, names: tuple[str, ...]):
        """A quantized checkpoint's tensors of one layer: the float ones (scales, ...) checked."""
        state = self.source.saved(layer, names)
        for part, tensor in (state or {}).items():
            check_finite(f"{layer}.{part}", tensor)
        return state

    def close(self) -> None:
        self.source.close()


def _checked(name: str, values: torch.Tensor) -> torch.Tensor:
    check_finite(name, values)
    return values
