"""Quantized linear layers on PyTorch's CPU kernels; activations stay floating point unless asked otherwise.

Int8Linear: symmetric int8, one scale per output channel, on tinylm::int8_rows (tinylm/kernels/int8_rows.cpp:
float32 activations against the stored int8 rows, one fixed float sequence per output, any row count; without a C++
toolchain `torch.ops.aten._weight_int8pack_mm`, as gpt-fast's WeightOnlyInt8Linear); or one scale per group of input
features (GGUF Q8_0 blocks, exact), run by dequantizing row chunks. With `activations="int8"` (per channel only)
each input row is also quantized to int8 on the fly, one scale per token (W8A8 dynamic, as vLLM's int8 w8a8), and
several rows multiply in int8 with exact int32 sums: up to 16 rows on tinylm's AVX-512 VNNI kernel over the stored
weight (tinylm/kernels/int8_gemm.cpp; the default model's products at 16 rows: 5.7 ms from memory, against 7.9 on
oneDNN's prepacked weight), more rows on oneDNN's `_int_mm`; on AVX2 CPUs without VNNI every row count on the
same file's VPMADDWD kernel (oneDNN's products are not exact there); without either or a C++ toolchain, on oneDNN
over a prepacked copy of the weight (int8_matmul.py). Int4Linear: asymmetric 4-bit by groups (GGUF Q4_0 / Q4_1 blocks as
stored) on tinylm's int4 x int8 kernel (tinylm/kernels/int4_gemm.cpp: activations quantized per block of 32 as
llama.cpp's Q8_0, exact int32 sums). Both keep checkpoint-readable names (`qweight`, `scales`, `zeros`, `bias`), and
both can also return dequantized rows (`lookup`), which is how one quantized copy serves as the embedding and the
tied output head. HalfLinear: a float layer stored in 16 bits.

Each class is a format (tinylm/quant/formats.py): it builds itself from float weights, GGUF blocks or saved
tensors, splits and joins its rows, and says what it saves; `@register` names its schemes for policies.

`kernel_dtype` is the dtype the kernel computes in; `dtype` is the model's, which outputs are cast back to.
Forward passes have no data-dependent Python branches and no host syncs, so torch.compile can trace them.

Where each lives: QuantLinearBase and HalfLinear in linear_base.py, Int8Linear in int8_linear.py, Int4Linear in
int4_linear.py; importing this module registers all of them.
"""

# in the order the schemes register (error messages list them so): fp16 / bf16, int8, int4
from tinylm.quant.linear_base import HalfLinear, QuantLinearBase  # isort: skip
from tinylm.quant.int8_linear import Int8Linear  # isort: skip
from tinylm.quant.int4_linear import Int4Linear  # isort: skip

__all__ = ["HalfLinear", "Int4Linear", "Int8Linear", "QuantLinearBase"]
