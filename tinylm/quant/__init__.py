"""Weight-only int8 / int4 quantization on PyTorch's CPU kernels, mixed-precision policies, quantized checkpoints,
a quality gate and a memory report. Heavy parts are imported where they are used."""

from tinylm.quant.policy import BUILTIN, QuantPolicy, parse_policy

__all__ = ["BUILTIN", "QuantPolicy", "parse_policy"]
