"""int8 x int8 products for W8A8 layers: tinylm's kernel over the stored weight where it runs (`kernel_sums`,
`int8_gemm`; tinylm/kernels/int8_gemm.cpp: decode batches on AVX-512 VNNI, every row count on AVX2 CPUs without
VNNI), else oneDNN over a weight it has reordered once instead of on every call.

`torch._int_mm` (oneDNN underneath) reorders the weight into its blocked VNNI layout on every call: at batch 16
that reorder reads the whole weight from memory again and costs as much as the product (the default model's layers:
12.8 ms per decode step on the 2-core AVX-512 EPYC). oneDNN's quantized linear with a prepacked weight
(`onednn::qlinear_prepack`, as PyTorch's own x86 int8 path uses) skips it: about 2x faster on these shapes.

A prepacked weight is an opaque MKLDNN tensor, which torch.compile cannot trace; the product is therefore the custom
op `tinylm::int8_mm`, which gets the plain int8 weight (for its shape, and the fallback) and a handle to the packed
copy, kept by the layer and found here through a weak registry. Where oneDNN's op is missing or fails (a CPU
build without it), the op runs `torch._int_mm`.

On x86 CPUs without VNNI (AVX2 only) the prepacked product is not exact: its uint8 x int8 products are summed in
pairs into int16 (VPMADDUBSW), which saturates (sums off by up to ~1e5 on random int8 inputs, measured on an AVX2
EPYC), so results were wrong and depended on the batch. There no weight is prepacked: tinylm's AVX2 kernel
(VPMADDWD, exact) takes the layers whose shapes it tiles, and `torch._int_mm`, exact there but at well under
1 GMAC/s, the rest (tests/quant/test_w8a8.py checks the sums at full int8 range).
"""

from __future__ import annotations

import itertools
import platform
import weakref

import torch

_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # handle -> packed weight
_HANDLES = itertools.count(1)
_HAS_ONEDNN = hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()


def _exact_onednn_int8() -> bool:
    """Whether oneDNN's uint8 x int8 products sum exactly here: not on x86 without VNNI (see the docstring)."""
    from tinylm import kernels

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return any(name in kernels.cpu_flags() for name in ("avx512_vnni", "avx_vnni", "amx_int8"))


def kernel_sums(qweight: torch.Tensor) -> torch.Tensor | None:
    """(N,) int32 row sums of qweight (N, K) for tinylm::int8_gemm (tinylm/kernels/int8_gemm.cpp, which reads the
    plain weight: no packed copy), or None where that kernel cannot run (neither AVX-512 VNNI nor AVX2, no C++
    toolchain, N not a multiple of 16 or K of 4); oneDNN's packed product is used then."""
    from tinylm import kernels

    rows, cols = qweight.shape
    if rows % 16 or cols % 4 or qweight.device.type != "cpu" or not kernels.int8_gemm_available():
        return None
    return qweight.sum(dim=1, dtype=torch.int32)


def int8_gemm(x_u8: torch.Tensor, qweight: torch.Tensor, weight_sums: torch.Tensor,
              weight_scales: torch.Tensor) -> torch.Tensor:
    """x_u8 (M, K) uint8 = int8 + 128, qweight (N, K) int8 -> (M, N) float32 = (x_int8 @ qweight.T) * weight_scales,
    on tinylm's kernel (exact int32 sums, as oneDNN's)."""
    return torch.ops.tinylm.int8_gemm(x_u8, qweight, weight_sums, weight_scales)


def prepack(qweight: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(handle, packed weight or None when oneDNN cannot pack it). The caller keeps the packed tensor alive; the
    registry only points at it."""
    handle = next(_HANDLES)
    if not (_HAS_ONEDNN and _exact_onednn_int8()):
        return handle, None
    try:
        packed = torch.ops.onednn.qlinear_prepack(qweight, None)
    except RuntimeError:
        return handle, None
    _PACKED[handle] = packed
    return handle, packed


# Registered with torch.library.Library rather than @custom_op: a call through the dispatcher then costs ~1 us
# instead of ~7 (custom_op's wrappers), which is 0.7 ms per decode step at 121 products.
_LIBRARY = torch.library.Library("tinylm", "FRAGMENT")
_LIBRARY.define("int8_mm(Tensor x_u8, Tensor qweight, Tensor weight_scales, int handle) -> Tensor")


def int8_mm(x_u8: torch.Tensor, qweight: torch.Tensor, weight_scales: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.ops.tinylm.int8_mm.default(x_u8, qweight, weight_scales, handle)


def _int8_mm_cpu(x_u8: torch.Tensor, qweight: torch.Tensor, weight_scales: torch.Tensor, handle: int) -> torch.Tensor:
    """x_u8 (M, K) uint8 = int8 activations + 128 (oneDNN's x86 kernels take unsigned inputs with a zero point),
    qweight (N, K) int8, weight_scales (N,) float32 -> (M, N) float32 = (x_int8 @ qweight.T) * weight_scales.
    Sums are exact (int32) on either path."""
    packed = _PACKED.get(handle)
    if packed is None:
        x_int8 = (x_u8.to(torch.int16) - 128).to(torch.int8)
        return torch._int_mm(x_int8, qweight.t()).float() * weight_scales
    return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, packed, weight_scales, _zeros(qweight.shape[0]), None,
                                              1.0, 0, torch.float32, "none", [], "")


_LIBRARY.impl("int8_mm", _int8_mm_cpu, "CPU")


@torch.library.register_fake("tinylm::int8_mm", lib=_LIBRARY)
def _(x_u8: torch.Tensor, qweight: torch.Tensor, weight_scales: torch.Tensor, handle: int) -> torch.Tensor:
    return x_u8.new_empty((x_u8.shape[0], qweight.shape[0]), dtype=torch.float32)


_ZEROS: dict[int, torch.Tensor] = {}


def _zeros(rows: int) -> torch.Tensor:
    """The weight's zero points (symmetric: all 0), one int64 per output channel, made once per size."""
    if rows not in _ZEROS:
        _ZEROS[rows] = torch.zeros(rows, dtype=torch.long)
    return _ZEROS[rows]
