"""How LLM() and tinylm.load turn their arguments into what an LLM runs: vLLM's constructor arguments checked
(_IGNORED_ARGS, _DEFAULT_ONLY), device and dtype "auto" resolved, another tokenizer attached, speculative decoding's
draft (a model or n-gram lookup) loaded and checked against the target, and the EngineConfig built.

The weights themselves are read by tinylm/loading.py (load_model); this module decides what to ask it for. `load`
stays in tinylm/llm.py because it returns an LLM, and this module sits below llm.py (layers import one way).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from tinylm import hub, kernels
from tinylm.engine.engine import EngineConfig
from tinylm.engine.kv_pool import pool_dtype
from tinylm.engine.ngram import NGRAM
from tinylm.engine.speculative import check_draft, check_num_tokens
from tinylm.errors import ConfigError
from tinylm.loading import load_model
from tinylm.weights.loader import LoadedModel

# vLLM constructor arguments that change no output here (GPU memory, logging, graph capture, downloads): accepted
_IGNORED_ARGS = frozenset({
    "trust_remote_code", "gpu_memory_utilization", "swap_space", "disable_log_stats", "max_seq_len_to_capture",
    "disable_custom_all_reduce", "disable_async_output_proc", "compilation_config", "download_dir", "hf_token",
    "enforce_eager", "max_logprobs",
})
# vLLM constructor arguments tinylm honours only at their default value (one process, one device, no adapters)
_DEFAULT_ONLY = {
    "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1, "cpu_offload_gb": 0,
    "enable_lora": False, "tokenizer_mode": "auto", "revision": None, "tokenizer_revision": None,
    "code_revision": None, "load_format": "auto", "distributed_executor_backend": None,
}


def check_extra_args(kwargs: dict) -> None:
    """Refuse, by name, vLLM arguments tinylm cannot honour and names it does not know."""
    unknown = sorted(name for name in kwargs if name not in _IGNORED_ARGS and name not in _DEFAULT_ONLY)
    if unknown:
        raise ValueError(f"LLM() got arguments tinylm does not know or support: {', '.join(unknown)}")
    refused = [f"{name}={value!r} (supported: {_DEFAULT_ONLY[name]!r})" for name, value in kwargs.items()
               if name in _DEFAULT_ONLY and value != _DEFAULT_ONLY[name]]
    if refused:
        raise ValueError(f"tinylm cannot honour {', '.join(refused)}: it runs one model on one device")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, path: Path, device: str) -> str | torch.dtype:
    """vLLM's "auto": the checkpoint's dtype (config.json torch_dtype), bfloat16 for float16 checkpoints on CPU
    (as vLLM's CPU backend); float32 where a folder records none.

    A GGUF file records no float dtype (its weights are quantized blocks): it computes in bfloat16 where the device
    does so natively (AVX512-BF16 or AMX, a GPU), else float32. bfloat16 halves the weight bytes every decode step
    reads, and compiled bfloat16 products run at memory speed on such CPUs (DESIGN.md, kernel facts); elsewhere
    bfloat16 products are emulated, and float32 is the faster of the two: there a GGUF file and a 16-bit
    checkpoint compute in float32 on weights stored in bfloat16 (resolve_weight_dtype)."""
    if dtype != "auto":
        return dtype
    if resolve_weight_dtype(dtype, path, device, None) is not None:
        return "float32"
    if path.is_file():
        return "bfloat16" if native_bf16(device) else "float32"
    stored = _stored_dtype(path)
    if stored == "float16" and not device.startswith("cuda"):
        return "bfloat16"
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def resolve_weight_dtype(dtype: str | torch.dtype, path: Path, device: str, quantize: str | None) -> torch.dtype | None:
    """What "auto" stores float linear weights in when it is not the compute dtype: on a CPU without native
    bfloat16, bfloat16 for a GGUF file and for a checkpoint stored in bfloat16 or float16, which compute in float32
    there (resolve_dtype). tinylm's kernels widen bfloat16 weights to float32 exactly (float32 arithmetic on
    weights rounded once, as the bfloat16 model of AVX-512 BF16 hosts stores them; a bfloat16 checkpoint's exactly
    as stored), and a batch-1 decode step reads half the bytes: the default model's 540 MB -> 270 MB, 47 -> 82
    tokens/s on an AVX2 EPYC (BENCHMARKS.md). A GGUF file's Q4_0-Q8_0 and Q4_K-Q6_K weights go further: they
    keep their blocks, exactly (load_for_engine). None: weights in the compute dtype (an explicit dtype, a quantization
    policy, a float32 checkpoint, native bfloat16, a GPU)."""
    if dtype != "auto" or quantize is not None or str(device).startswith("cuda") or native_bf16(device):
        return None
    return torch.bfloat16 if path.is_file() or _stored_dtype(path) in ("bfloat16", "float16") else None


def load_for_engine(path: Path, dtype: str | torch.dtype, device: str, quantize: str | None, check_finite: bool,
                    batch_invariant: bool) -> LoadedModel:
    """load_model with the weight storage the engine computes on (`model.weight_dtype`, resolve_weight_dtype): where
    float32 linear weights are stored in bfloat16, a GGUF file's Q4_0-Q8_0 and Q4_K-Q6_K weights instead keep their
    blocks as they are, read straight into BlockLinear layers (tinylm/weights/loader.py load_gguf_file): bitwise the
    float32 model, at ~0.75-1.25 bytes a weight (the default model's batch-1 step: 270 MB in bfloat16 -> 111 MB), and
    never held as float32. Blocks run on the batch-invariant kernels: with batch invariance off, float layers."""
    weight_dtype = resolve_weight_dtype(dtype, path, device, quantize)
    blocks = batch_invariant and weight_dtype == torch.bfloat16 and path.is_file() and blocks_pay()
    loaded = load_model(path, dtype=resolve_dtype(dtype, path, device), device=device, quantize=quantize,
                        check_finite=check_finite, gguf_blocks=blocks)
    loaded.model.weight_dtype = weight_dtype
    return loaded


def blocks_pay() -> bool:
    """Whether tinylm's kernels widen GGUF blocks with vector instructions here (x86 with AVX2 or AVX-512): on
    other CPUs the scalar widening would be slower than bfloat16 weights."""
    return kernels.available() and torch.ops.tinylm.invariant_blocks_vectorized()


def _stored_dtype(path: Path) -> str:
    """A folder's config.json torch_dtype (or dtype); float32 where it records none."""
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else {}
    except (OSError, ValueError):
        config = {}
    return config.get("torch_dtype") or config.get("dtype") or "float32"


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively: a GPU, or a CPU with AVX512-BF16 or AMX (its /proc/cpuinfo)."""
    if str(device).startswith("cuda"):
        return True
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def with_tokenizer(loaded: LoadedModel, tokenizer, model, skip: bool) -> LoadedModel:
    """vLLM's tokenizer argument (a folder holding another tokenizer) and skip_tokenizer_init (token ids only)."""
    if skip:
        return replace(loaded, tokenizer=None)
    if tokenizer is None or str(tokenizer) == str(model):
        return loaded
    from tinylm.tokenizer import Tokenizer

    folder = Path(tokenizer).expanduser()
    if not folder.is_dir():
        raise ValueError(f"tokenizer must be a local folder with tokenizer.json, got {str(tokenizer)!r}")
    return replace(loaded, tokenizer=Tokenizer.from_folder(folder))


def build_engine_config(**given) -> EngineConfig:
    """EngineConfig from the vLLM arguments given (None: tinylm's default)."""
    pool_dtype(given["kv_cache_dtype"], torch.float32)  # a bad name is refused here, with tinylm's message
    return EngineConfig(**{name: value for name, value in given.items() if value is not None})


def speculative_draft(spec: dict, loaded: LoadedModel, dtype, device: str) -> tuple[LoadedModel | str, int]:
    """vLLM's speculative_config: {"method": "ngram"} or {"model": draft}, with "num_speculative_tokens"."""
    unknown = sorted(set(spec) - {"method", "model", "num_speculative_tokens"})
    if unknown:
        raise ValueError(f"speculative_config keys tinylm does not support: {', '.join(unknown)}")
    count = spec.get("num_speculative_tokens", 3)
    check_num_tokens(count)
    if spec.get("method") == "ngram":
        return NGRAM, count
    if spec.get("method") not in (None, "draft_model") or "model" not in spec:
        raise ValueError("speculative_config needs {'method': 'ngram'} or {'model': DRAFT}")
    draft_path = hub.resolve(spec["model"])
    return load_draft(loaded, spec["model"], resolve_dtype(dtype, draft_path, device), device, None), count


def file_bytes(source) -> int:
    """The size of a checkpoint: its file, or the files directly in its folder."""
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


def load_draft(loaded: LoadedModel, draft: str | os.PathLike, dtype, device: str,
               draft_quantize: str | None, check_finite: bool = True) -> LoadedModel:
    draft_loaded = load_model(hub.resolve(draft), dtype=dtype, device=device, quantize=draft_quantize,
                              check_finite=check_finite)
    check_draft(loaded.model.config, draft_loaded.model.config)
    check_same_tokens(loaded.tokenizer, draft_loaded.tokenizer)
    return draft_loaded


def check_same_tokens(target, draft) -> None:
    """A draft with another tokenizer of the same size would be accepted token id by token id, meaninglessly."""
    if target is not None and draft is not None and target.backend.get_vocab() != draft.backend.get_vocab():
        raise ConfigError("the draft model's tokenizer differs from the model's; speculative decoding needs one "
                          "tokenizer")
