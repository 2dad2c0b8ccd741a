"""Hand-written CPU kernels for decode steps, built once for this machine on first use.

Inductor writes good loops for element-wise work and streaming reductions, but not for one-query attention over a
paged cache (it reduces every score with a horizontal vector sum and runs the softmax on one thread: 134 us per
layer at batch 16 on the 2-core EPYC, BENCHMARKS.md issue 5). `decode_attention.cpp` does it flash-decoding
style; `int8_gemm.cpp` runs W8A8 products from the stored weight (decode batches on AVX-512 VNNI, every row
count on AVX2 CPUs without VNNI), `bf16_gemm.cpp` bf16 products of 1-16 rows on AVX-512 BF16 (compiled bf16
decode, its batches, speculative verification), `invariant_gemm.cpp` batch-invariant products (each output
element one fixed float32 sequence whatever the batch; wrapper `invariant.py`), `delta_rule.cpp` Gated
DeltaNet's recurrence token by token, `deltanet_mix.cpp` its whole token mixing and `invariant_experts.cpp` a
mixture-of-experts block's routed experts (batch-invariant inference), `int8_rows.cpp` weight-only int8 products
(the int4 policy's output head), `invariant_blocks.cpp` float32 products on GGUF Q4_0-Q8_0 and Q4_K-Q6_K blocks
widened exactly (a GGUF model's default form on CPUs without native bfloat16; tinylm/model/block_linear.py). The sources
are compiled with torch's cpp_extension (the C++ compiler torch.compile needs anyway, and the `ninja` package) into
~/.cache/torch_extensions, once per source and CPU (`-march=native`: ~20 s, then loaded in about a second); if that
is impossible, `available()` says False, warns once, and callers keep their PyTorch formulation.

    tinylm.kernels.available()  -> True once torch.ops.tinylm.paged_attention exists
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name)
           for name in ("decode_attention.cpp", "int8_gemm.cpp", "bf16_gemm.cpp", "invariant_gemm.cpp",
                         "invariant_attention.cpp", "invariant_rows.cpp", "int4_gemm.cpp", "delta_rule.cpp",
                         "deltanet_mix.cpp", "invariant_experts.cpp", "int8_rows.cpp", "invariant_blocks.cpp")]
# included by the sources: part of the build's name too
HEADERS = [Path(__file__).with_name(name)
           for name in ("vec_rows.h", "attend_chunk.h", "invariant_amx.h", "invariant_ops.h", "delta_rule.h",
                         "invariant_vec.h", "fp_contract_off.h", "avx2_int.h", "invariant_tiles.h")]
_STATE: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call: ~20 s, then cached on disk)."""
    if "ok" not in _STATE:
        _STATE["ok"] = _build()
    return _STATE["ok"]


def version() -> str:
    """Changes with the kernel sources, the CPU and torch: the name of this machine's build."""
    return _extension_name()


def _build() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return False
    _find_ninja()
    name = _extension_name()
    try:
        from torch.utils.cpp_extension import load

        _clear_stale_lock(name)
        log.info("building tinylm's CPU kernels (once per machine; cached in torch's extension directory)")
        load(name, [str(s) for s in SOURCES], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp", *_vector_flags()], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: fall back, say why once
        warnings.warn(f"tinylm's CPU kernels could not be built ({type(exc).__name__}: {_first_error(exc)}); "
                      "using PyTorch formulations", RuntimeWarning, stacklevel=3)
        return False
    _register_fakes()
    return True


def _clear_stale_lock(name: str) -> None:
    """cpp_extension waits, without a limit, while another build's lock file exists; a build killed midway leaves
    one behind. A lock older than any real build (10 minutes) is removed so the next process builds again."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink()
    except OSError:
        pass  # no lock, or another process removed it first


def _find_ninja() -> None:
    """cpp_extension runs `ninja` from PATH; the pip package's binary is not there unless the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _first_error(exc: Exception) -> str:
    """The compiler's first error line when there is one (the exception starts with the whole command line)."""
    lines = str(exc).splitlines() or [""]
    return next((line for line in lines if "error" in line.lower() and ": " in line), lines[0])[:300]


def _vector_flags() -> list[str]:
    """ATen's vector types (at::vec::Vectorized) at the width PyTorch itself picked for this CPU, as Inductor does."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return []


def _extension_name() -> str:
    """One build per source text and CPU: `-march=native` code must not run on another CPU sharing the cache."""
    digest = hashlib.sha1()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(cpu_flags().encode())
    digest.update(torch.__version__.encode())
    return f"tinylm_kernels_{digest.hexdigest()[:12]}"


@functools.cache
def cpu_flags() -> str:
    """This CPU's flags line of /proc/cpuinfo ("flags ..." on x86, "Features ..." on ARM), read once; else the
    processor name. What the build is keyed by, and what callers test ISA extensions against."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the op itself only runs on real tensors)."""
    @torch.library.register_fake("tinylm::paged_attention")
    def _(q, k_pool, v_pool, slots, valid, scale, k_scales=None, v_scales=None):
        return torch.empty_like(q)

    @torch.library.register_fake("tinylm::invariant_attention")
    def _(q, k_pool, v_pool, slots, rows, starts, ends, scale, k_scales=None, v_scales=None):
        return torch.empty_like(q)  # (R, H, D) float32

    @torch.library.register_fake("tinylm::bf16_gemm")
    def _(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("tinylm::int8_gemm")
    def _(x_u8, weight, weight_sums, weight_scales):
        return x_u8.new_empty((x_u8.shape[0], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("tinylm::int4_gemm")
    def _(x, qweight, scales, isa=0):
        return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("tinylm::int8_rows")
    def _(x, qweight, scales, isa=0):
        return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)  # (M, N)

    @torch.library.register_fake("tinylm::invariant_linear")
    def _(x, weight, bias=None, float_out=False):
        dtype = torch.float32 if float_out else x.dtype
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)  # (M, N) in x's dtype or float32

    @torch.library.register_fake("tinylm::invariant_blocks_linear")
    def _(x, codes, scales, mins, bits, bias=None):
        return x.new_empty((x.shape[0], codes.shape[0]))  # (M, N) float32

    @torch.library.register_fake("tinylm::invariant_rms_norm")
    def _(x, weight, eps, zero_centered):
        return torch.empty_like(x, memory_format=torch.contiguous_format)  # (M, C)

    @torch.library.register_fake("tinylm::invariant_silu_mul")
    def _(gate, up):
        return gate.new_empty(gate.shape)  # (M, I), contiguous

    @torch.library.register_fake("tinylm::invariant_sigmoid_gate")
    def _(gate, x):
        return x.new_empty(x.shape)  # (M, D), contiguous

    @torch.library.register_fake("tinylm::gated_delta_rule")
    def _(q, k, v, g, beta, state):
        return v.new_empty(v.shape), state.new_empty(state.shape)  # (B, H, T, D_v), (B, H, D_k, D_v)

    @torch.library.register_fake("tinylm::invariant_deltanet_mix")
    def _(qkv, z, b, a, conv_state, recurrent_state, lengths, conv_weight, A_log, dt_bias, norm_weight, eps,
          num_k_heads, head_k_dim):
        batch, steps, channels = qkv.shape
        heads, head_v_dim = z.shape[2], z.shape[3]
        return (qkv.new_empty(batch, steps, heads * head_v_dim),  # (B, T, H_v D_v)
                qkv.new_empty(batch, channels, conv_weight.shape[-1] - 1),  # (B, C, K-1)
                qkv.new_empty(batch, heads, head_k_dim, head_v_dim, dtype=torch.float32))  # (B, H_v, D_k, D_v)

    @torch.library.register_fake("tinylm::invariant_moe_experts")
    def _(tokens, router_logits, gate_up_stack, down_stack, top_k, normalize):
        return torch.empty_like(tokens, memory_format=torch.contiguous_format)  # (N, C)

    from tinylm.kernels.invariant import register_autograd

    register_autograd()


INT8_GEMM_AVX2, INT8_GEMM_VNNI = 2, 3  # int8_gemm_isa()'s answers (0: no path)


def int8_gemm_isa() -> int:
    """Which path tinylm::int8_gemm has here: 0 none (no kernels, or neither ISA), INT8_GEMM_AVX2 (every row count),
    INT8_GEMM_VNNI (up to 16 rows; more through oneDNN)."""
    return int(torch.ops.tinylm.int8_gemm_isa()) if available() else 0


def int8_gemm_available() -> bool:
    """Whether tinylm::int8_gemm runs here (the kernels are built and the CPU has AVX-512 VNNI, or AVX2)."""
    return int8_gemm_isa() != 0


def bf16_gemm_available() -> bool:
    """Whether tinylm::bf16_gemm has its AVX-512 BF16 path here (elsewhere the op is at::mm)."""
    return available() and bool(torch.ops.tinylm.bf16_gemm_available())
