"""Weight-only int8 / int4 quantization on PyTorch's CPU kernels, mixed-precision policies, quantized checkpoints,
a quality gate and a memory report. Heavy parts are imported where they are used.

The built-in formats (tinylm/quant/linear.py) are imported first: they register their scheme names, which the
built-in policies below are checked against."""

from tinylm.quant import linear  # noqa: F401 - registers int8, int4, fp16, bf16 (tinylm/quant/formats.py)
from tinylm.quant.policy import BUILTIN, QuantPolicy, parse_policy

__all__ = ["BUILTIN", "QuantPolicy", "parse_policy"]
